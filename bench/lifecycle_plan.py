"""The lifecycle predecessor look-up, 0.2.0's form beside 0.3.0's, with 1M deliveries.

usage: python3 bench/lifecycle_plan.py   (after make install or make install-release)

Prints the time to build deliveries_conversion on 1,004,000 rows (what the 0.2.0 → 0.3.0
update does when the index is not there yet), EXPLAIN (ANALYZE, BUFFERS) of both forms of
the predecessor look-up for 40 (conversion, endpoint) pairs, and the time of a status
UPDATE of 2,000 conversions beside the 1M deliveries.
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from cluster import Cluster
c = Cluster.create(settings={"shared_preload_libraries": "''", "shared_buffers": "'1GB'", "max_wal_size": "'8GB'"})
c.start()
try:
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        conn.execute("INSERT INTO postback.endpoints (name, url_template, events) VALUES "
                     "('network', 'https://network.example/pb?cid={click_id}', '{sale}'), "
                     "('partner', 'https://partner.example/pb?tx={transaction_id}', '{sale}')")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, status) "
                     "SELECT 'c' || g, 'lc-' || g, 'sale', 'pending' FROM generate_series(1, 2000) g")
        conn.execute("INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, state, completed_at) "
                     "SELECT 1, 2000000000 + g, 'sale', 'approved', 'hist.' || g, 'GET', 'https://n.example/', 'succeeded', now() FROM generate_series(1, 1000000) g")
        conn.execute("VACUUM ANALYZE postback.deliveries")
        conn.execute("DROP INDEX postback.deliveries_conversion")
        t = time.perf_counter()
        conn.execute("CREATE INDEX deliveries_conversion ON postback.deliveries (conversion_id, endpoint_id, id) WHERE conversion_id IS NOT NULL")
        print(f"CREATE INDEX deliveries_conversion on {conn.execute('SELECT count(*) FROM postback.deliveries').fetchone()[0]:,} rows: {time.perf_counter() - t:.2f} s")
        conn.execute("ANALYZE postback.deliveries")
        old = """SELECT (SELECT max(p.id) FROM postback.deliveries p
                   WHERE p.idempotency_key >= (r.c::text || '.' || r.e::text || '.') COLLATE "C"
                     AND p.idempotency_key <  (r.c::text || '.' || r.e::text || '/') COLLATE "C")
                 FROM (SELECT c.id AS c, e.id AS e FROM postback.conversions c, postback.endpoints e WHERE c.id <= 20) r"""
        new = """SELECT (SELECT p.id FROM postback.deliveries p WHERE p.conversion_id = r.c AND p.endpoint_id = r.e
                   ORDER BY p.conversion_id DESC, p.endpoint_id DESC, p.id DESC LIMIT 1)
                 FROM (SELECT c.id AS c, e.id AS e FROM postback.conversions c, postback.endpoints e WHERE c.id <= 20) r"""
        for label, q in (("0.2.0 (key range, max(id))", old), ("0.3.0 (index probe)", new)):
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + q))
            print(f"--- {label}\n{plan}")
        t = time.perf_counter()
        conn.execute("UPDATE postback.conversions SET status = 'approved'")
        print(f"UPDATE of 2,000 conversions beside 1M deliveries (0.3.0): {time.perf_counter() - t:.3f} s")
finally:
    c.destroy()
