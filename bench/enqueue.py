"""Enqueue cost: T_on / T_off and T_on / (T_off + T_rows), measured side by side in one run.

T_on   one INSERT … SELECT of N sale conversions with 2 matching endpoints
T_off  the same insert with the enqueue trigger disabled
T_rows inserting the delivery rows T_on produced into a copy of postback.deliveries
       with the same indexes (CREATE TABLE … (LIKE postback.deliveries INCLUDING ALL))
Best of two for each. The cluster runs without the worker so nothing else competes.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from cluster import Cluster  # noqa: E402

SIZES = [int(x) for x in (sys.argv[1:] or ["10000", "100000"])]
INSERT = ("INSERT INTO postback.conversions (click_id, transaction_id, event, amount, currency, attributes) "
          "SELECT 'clk-' || g, %s || g, 'sale', g * 0.5, 'EUR', jsonb_build_object('sub1', 's' || g) "
          "FROM generate_series(1, %s) g")


def timed(conn, sql, params=()):
    conn.execute("CHECKPOINT")
    started = time.perf_counter()
    conn.execute(sql, params)
    return time.perf_counter() - started


def main():
    c = Cluster.create(settings={"shared_preload_libraries": "''", "shared_buffers": "'1GB'",
                                 "max_wal_size": "'8GB'", "checkpoint_timeout": "'1h'"})
    try:
        c.start()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            conn.execute(
                "INSERT INTO postback.endpoints (name, kind, url_template, events) VALUES "
                "('network', 'postback', 'https://network.example/pb?cid={click_id}&tx={transaction_id}"
                "&amount={amount}&cur={currency}&sub1={attributes.sub1}', '{sale}'), "
                "('partner', 'webhook', 'https://partner.example/hooks/conversions', '{sale,lead}'), "
                "('leads-only', 'postback', 'https://other.example/pb?cid={click_id}', '{lead}')")
            conn.execute("CREATE TABLE public.deliveries_copy (LIKE postback.deliveries INCLUDING ALL)")
            reset = "TRUNCATE postback.conversions, postback.deliveries, postback.attempts"
            run = 0
            print(f"{'rows':>8} {'T_on s':>8} {'T_off s':>8} {'T_rows s':>8} {'on/off':>7} {'on/(off+rows)':>14}")
            for n in SIZES:
                t_on, t_off, t_rows = [], [], []
                for _ in range(2):
                    conn.execute(reset)
                    conn.execute("ALTER TABLE postback.conversions DISABLE TRIGGER conversions_enqueue_inserted")
                    run += 1
                    t_off.append(timed(conn, INSERT, (f"r{run}-", n)))
                    conn.execute("ALTER TABLE postback.conversions ENABLE TRIGGER conversions_enqueue_inserted")
                    conn.execute(reset)
                    run += 1
                    t_on.append(timed(conn, INSERT, (f"r{run}-", n)))
                    made = conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0]
                    assert made == 2 * n, made
                    conn.execute("TRUNCATE public.deliveries_copy")
                    t_rows.append(timed(conn, "INSERT INTO public.deliveries_copy SELECT * FROM postback.deliveries"))
                on, off, rows = min(t_on), min(t_off), min(t_rows)
                print(f"{n:>8} {on:>8.3f} {off:>8.3f} {rows:>8.3f} {on / off:>7.2f} {on / (off + rows):>14.2f}")
            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('postback.deliveries')), "
                                "pg_total_relation_size('postback.deliveries') / greatest(count(*), 1) "
                                "FROM postback.deliveries").fetchone()
            print(f"deliveries table + indexes: {size[0]} ({size[1]} bytes per delivery)")
    finally:
        c.destroy()


if __name__ == "__main__":
    main()
