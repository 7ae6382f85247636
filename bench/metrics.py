"""postback.metrics and endpoint_health on 1M deliveries and 5M attempts, beside a plain
count(*) of the same deliveries (what any query over the table costs at least).

usage: python3 bench/metrics.py   (after make install or make install-release)

250,000 conversions over 30 days, 4 endpoints, 1,000,000 finished deliveries (95%
succeeded), 5 attempts each; no worker serves the database. Prints the median of 3 runs
of each query and the ratio to the plain count, and metrics before the history is rolled
up (what 0.2.0's view did on every call).
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from cluster import Cluster  # noqa: E402

N_CONVERSIONS = 250_000


def median_seconds(conn, sql, runs=3):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        conn.execute(sql).fetchall()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    c = Cluster.create(settings={"postback.database_name": "'elsewhere'", "shared_buffers": "'1GB'",
                                 "max_wal_size": "'8GB'", "work_mem": "'64MB'"})
    c.start()
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            conn.execute("INSERT INTO postback.endpoints (name, url_template, paused_at) "
                         "SELECT 'e' || g, 'https://p' || g || '.example/pb?c={click_id}', now() "
                         "FROM generate_series(1, 4) g")
            t = time.perf_counter()
            conn.execute("ALTER TABLE postback.conversions DISABLE TRIGGER USER")
            conn.execute(
                "INSERT INTO postback.conversions (click_id, transaction_id, event, status, partner, created_at) "
                "SELECT 'c' || g, 'm-' || g, (ARRAY['sale','lead'])[1 + g % 2], "
                "       (ARRAY['approved','approved','approved','reversed','pending'])[1 + g % 5], "
                "       'net-' || (g % 20), now() - (g % 720) * interval '1 hour' "
                f"FROM generate_series(1, {N_CONVERSIONS}) g")
            conn.execute("ALTER TABLE postback.conversions ENABLE TRIGGER USER")
            conn.execute(
                "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method,"
                "                                 url, state, attempts, created_at, completed_at) "
                "SELECT e, c.id, c.event, c.status, c.id || '.' || e, 'GET', 'https://p.example/', "
                "       CASE WHEN c.id % 20 = 0 THEN 'dead' ELSE 'succeeded' END, 5, c.created_at, "
                "       c.created_at + (c.id % 5000) * interval '1 millisecond' "
                # rows land in the order they are created, as the enqueue writes them
                "FROM postback.conversions c, generate_series(1, 4) e ORDER BY c.created_at, c.id, e")
            conn.execute(
                "INSERT INTO postback.attempts (delivery_id, attempt_no, started_at, duration_ms, status_code, outcome) "
                "SELECT d.id, a, d.created_at, 20 + a, CASE WHEN a = 5 THEN 200 ELSE 500 END, "
                "       CASE WHEN a = 5 THEN 'succeeded' ELSE 'retry' END "
                "FROM postback.deliveries d, generate_series(1, 5) a")
            conn.execute("VACUUM ANALYZE")
            counts = conn.execute("SELECT (SELECT count(*) FROM postback.deliveries), "
                                  "(SELECT count(*) FROM postback.attempts)").fetchone()
            print(f"loaded {counts[0]:,} deliveries and {counts[1]:,} attempts in {time.perf_counter() - t:.0f} s")
            plain = median_seconds(conn, "SELECT count(*) FROM postback.deliveries")
            unrolled = median_seconds(conn, "SELECT * FROM postback.metrics", runs=1)
            t = time.perf_counter()
            while conn.execute("SELECT postback.roll_up()").fetchone()[0]:
                pass
            rolled_in = time.perf_counter() - t
            metrics = median_seconds(conn, "SELECT * FROM postback.metrics")
            health = median_seconds(conn, "SELECT * FROM postback.endpoint_health")
            print(f"plain count(*) of deliveries      {plain * 1000:8.1f} ms")
            print(f"metrics before any roll-up       {unrolled * 1000:8.1f} ms   ratio {unrolled / plain:6.1f}")
            print(f"rolling up 30 days (what the worker does once after the update): {rolled_in:.1f} s")
            print(f"SELECT * FROM postback.metrics    {metrics * 1000:8.1f} ms   ratio {metrics / plain:6.1f}")
            print(f"SELECT * FROM postback.endpoint_health {health * 1000:8.1f} ms   ratio {health / plain:6.1f}")
    finally:
        c.destroy()


if __name__ == "__main__":
    main()
