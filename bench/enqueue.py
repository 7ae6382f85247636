"""Enqueue cost, measured side by side in one run (best of two for each figure).

T_on   one INSERT … SELECT of N conversions, enqueue trigger on
T_off  the same insert into a plain table: every trigger of ours on postback.conversions
       disabled (validation, enqueue, rollup counting), as a user without pg_postback feels it
T_rows inserting the delivery rows T_on produced into a copy of postback.deliveries with
       the same indexes (CREATE TABLE … (LIKE postback.deliveries INCLUDING ALL))

Scenarios:
  two        2 matching endpoints (a postback and a webhook) and a third that does not match
  partners3  1 partner endpoint + 2 global ones; every conversion's click names that partner
  partners1k 1,000 partner endpoints + 2 global; conversions spread over the 1,000 partners,
             each with a click to look up (its partner comes from the click)
  clicks1m   as partners1k, with 1,000,000 clicks in postback.clicks, against the same
             insert whose conversions carry their partner and no clicks table rows

Lifecycle (a status UPDATE of 2,000 conversions, 2 matching endpoints, best of two):
  T_empty    the UPDATE with no other deliveries in the table
  T_history  the same UPDATE with HISTORY finished deliveries of other conversions
             written after these conversions (as on day 300: the pending deliveries
             being followed are old, the history is newer)
  T_plain    the same UPDATE (with history) with every trigger of ours disabled

Watched table (postback.watch, the "two" endpoints, BIG rows, best of two):
  T_conv     the INSERT … SELECT of BIG conversions into postback.conversions, skipping
             duplicates as the watch does (ON CONFLICT (transaction_id) DO NOTHING)
  T_plain    the same without ON CONFLICT (a duplicate would fail the statement)
  T_watch    the same conversions inserted as orders into a watched table
             (public.orders, mapped by name; attributes from the unmapped column)
  T_orders   the same orders insert with the watch's trigger disabled (the shop alone)
  watch_ratio = T_watch / T_conv (goal <= 1.2); watch_vs_plain_ratio = T_watch / T_plain
  watch_update_ratio: one UPDATE reversing LIFECYCLE_N watched orders ÷ the same UPDATE
             of LIFECYCLE_N conversions (each announces the status to 2 endpoints)

The cluster runs without the worker so nothing else competes. Writes
target/bench/enqueue.json with the figures.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from cluster import Cluster  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
SIZES = [int(x) for x in (sys.argv[1:] or ["10000", "100000"])]
BIG = max(SIZES)

PLAIN = ("INSERT INTO postback.conversions (click_id, transaction_id, event, amount, currency, attributes) "
         "SELECT 'clk-' || g, %(tag)s || g, 'sale', g * 0.5, 'EUR', jsonb_build_object('sub1', 's' || g) "
         "FROM generate_series(1, %(n)s) g")
# conversions whose click is recorded: the partner comes from the click
VIA_CLICK = ("INSERT INTO postback.conversions (click_id, transaction_id, event, amount, currency, attributes) "
             "SELECT 'k' || g, %(tag)s || g, 'sale', g * 0.5, 'EUR', jsonb_build_object('sub1', 's' || g) "
             "FROM generate_series(1, %(n)s) g")
# the same conversions carrying their partner, with no click to look up
WITH_PARTNER = ("INSERT INTO postback.conversions (click_id, transaction_id, event, amount, currency, attributes, "
                "partner) SELECT 'none' || g, %(tag)s || g, 'sale', g * 0.5, 'EUR', "
                "jsonb_build_object('sub1', 's' || g), 'p' || (g %% %(partners)s + 1) "
                "FROM generate_series(1, %(n)s) g")

RESET = "TRUNCATE postback.conversions, postback.deliveries, postback.attempts"
LIFECYCLE_N = 2000
HISTORY = 1_000_000 if BIG >= 100_000 else 200_000
run_no = [0]


def timed(conn, sql, params=None):
    conn.execute("CHECKPOINT")
    started = time.perf_counter()
    conn.execute(sql, params)
    return time.perf_counter() - started


def measure(conn, insert, n, per_conversion, extra=None):
    """Best-of-two T_on, T_off, T_rows for `insert` of n conversions."""
    t_on, t_off, t_rows = [], [], []
    params = dict(extra or {}, n=n)
    for _ in range(2):
        conn.execute(RESET)
        conn.execute("ALTER TABLE postback.conversions DISABLE TRIGGER USER")
        run_no[0] += 1
        t_off.append(timed(conn, insert, dict(params, tag=f"r{run_no[0]}-")))
        conn.execute("ALTER TABLE postback.conversions ENABLE TRIGGER USER")
        conn.execute(RESET)
        run_no[0] += 1
        t_on.append(timed(conn, insert, dict(params, tag=f"r{run_no[0]}-")))
        made = conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0]
        assert made == per_conversion * n, (made, per_conversion * n)
        conn.execute("TRUNCATE public.deliveries_copy")
        t_rows.append(timed(conn, "INSERT INTO public.deliveries_copy SELECT * FROM postback.deliveries"))
    on, off, rows = min(t_on), min(t_off), min(t_rows)
    return {"n": n, "t_on": on, "t_off": off, "t_rows": rows, "ratio": on / off, "overhead": on / (off + rows)}


def lifecycle(conn, history, triggers=True):
    """Best-of-two time of a status UPDATE of LIFECYCLE_N conversions whose first
    deliveries are older than `history` finished deliveries."""
    times = []
    for _ in range(2):
        conn.execute(RESET)
        run_no[0] += 1
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, status) "
                     "SELECT 'clk-' || g, %s || g, 'sale', 'pending' FROM generate_series(1, %s) g",
                     (f"lc{run_no[0]}-", LIFECYCLE_N))
        if history:
            conn.execute(
                "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, "
                "                                 url, state, completed_at) "
                "SELECT e.id, 2000000000 + g, 'sale', 'approved', 'hist.' || g, 'GET', 'https://n.example/', "
                "       'succeeded', now() "
                "FROM generate_series(1, %s) g, (SELECT min(id) AS id FROM postback.endpoints) e", (history,))
        conn.execute("VACUUM ANALYZE postback.conversions, postback.deliveries")
        if not triggers:
            conn.execute("ALTER TABLE postback.conversions DISABLE TRIGGER USER")
        times.append(timed(conn, "UPDATE postback.conversions SET status = 'approved'"))
        if not triggers:
            conn.execute("ALTER TABLE postback.conversions ENABLE TRIGGER USER")
        else:
            made = conn.execute("SELECT count(*) FROM postback.deliveries WHERE status = 'approved' "
                                "AND predecessor_id IS NOT NULL").fetchone()[0]
            assert made == 2 * LIFECYCLE_N, made
    return min(times)


ORDERS = ("INSERT INTO public.orders (order_no, click, total, currency, sub1) "
          "SELECT %(tag)s || g, 'clk-' || g, g * 0.5, 'EUR', 's' || g FROM generate_series(1, %(n)s) g")


def watched(conn, n):
    """Best-of-two T_conv, T_watch, T_orders for n conversions (see the docstring)."""
    conn.execute("CREATE TABLE public.orders (order_no text PRIMARY KEY, click text NOT NULL, total numeric NOT NULL, "
                 "currency text NOT NULL, sub1 text, state text NOT NULL DEFAULT 'approved')")
    conn.execute("SELECT postback.watch('public.orders', %s)", (json.dumps({
        "click_id": "click", "transaction_id": "order_no", "event": "'sale'", "amount": "total",
        "currency": "currency", "status": "state"}),))
    t_conv, t_plain, t_watch, t_orders = [], [], [], []
    for _ in range(2):
        conn.execute(RESET)
        run_no[0] += 1
        t_conv.append(timed(conn, PLAIN + " ON CONFLICT (transaction_id) DO NOTHING", {"n": n, "tag": f"r{run_no[0]}-"}))
        conn.execute(RESET)
        run_no[0] += 1
        t_plain.append(timed(conn, PLAIN, {"n": n, "tag": f"r{run_no[0]}-"}))
        conn.execute(RESET)
        conn.execute("TRUNCATE public.orders")
        run_no[0] += 1
        t_watch.append(timed(conn, ORDERS, {"n": n, "tag": f"r{run_no[0]}-"}))
        made = conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0]
        assert made == 2 * n, (made, 2 * n)
        same = conn.execute("SELECT count(*) FROM postback.conversions WHERE attributes = jsonb_build_object("
                            "'sub1', 's' || substr(transaction_id, length(%s) + 1)) AND amount IS NOT NULL",
                            (f"r{run_no[0]}-",)).fetchone()[0]
        assert same == n, (same, n)  # the same conversions as the direct insert writes
        conn.execute("TRUNCATE public.orders")
        conn.execute("ALTER TABLE public.orders DISABLE TRIGGER USER")
        run_no[0] += 1
        t_orders.append(timed(conn, ORDERS, {"n": n, "tag": f"r{run_no[0]}-"}))
        conn.execute("ALTER TABLE public.orders ENABLE TRIGGER USER")
    # a status change (reversed) of LIFECYCLE_N orders in one UPDATE beside the same change of their conversions
    u_watch, u_conv = [], []
    for _ in range(2):
        conn.execute(RESET)
        conn.execute("TRUNCATE public.orders")
        run_no[0] += 1
        conn.execute(ORDERS, {"n": LIFECYCLE_N, "tag": f"u{run_no[0]}-"})
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, amount, currency, status) "
                     "SELECT 'clk-' || g, %s || g, 'sale', g * 0.5, 'EUR', 'approved' FROM generate_series(1, %s) g",
                     (f"d{run_no[0]}-", LIFECYCLE_N))
        conn.execute("VACUUM ANALYZE postback.conversions, postback.deliveries, public.orders")
        u_watch.append(timed(conn, "UPDATE public.orders SET state = 'reversed'"))
        u_conv.append(timed(conn, "UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id LIKE 'd%%'"))
        announced = conn.execute("SELECT count(*) FROM postback.deliveries WHERE status = 'reversed' "
                                 "AND predecessor_id IS NOT NULL").fetchone()[0]
        assert announced == 2 * 2 * LIFECYCLE_N, announced
    conv, watch, orders = min(t_conv), min(t_watch), min(t_orders)
    return {"n": n, "t_conv": conv, "t_plain": min(t_plain), "t_watch": watch, "t_orders": orders,
            "ratio": watch / conv, "plain_ratio": watch / min(t_plain),
            "t_update_watch": min(u_watch), "t_update_conv": min(u_conv), "update_ratio": min(u_watch) / min(u_conv)}


def show(name, m):
    print(f"{name:>11} {m['n']:>8} {m['t_on']:>8.3f} {m['t_off']:>8.3f} {m['t_rows']:>8.3f} "
          f"{m['ratio']:>7.2f} {m['overhead']:>14.2f}", flush=True)


def endpoints(conn, partners):
    conn.execute(RESET)
    conn.execute("DELETE FROM postback.endpoints")
    conn.execute(
        "INSERT INTO postback.endpoints (name, url_template, partners) "
        "SELECT 'aff-' || g, 'https://aff' || g || '.example/pb?cid={click_id}&tx={transaction_id}"
        "&amount={amount}&s1={click.sub1}&s2={attributes.sub1}', ARRAY['p' || g] "
        "FROM generate_series(1, %s) g", (partners,))
    conn.execute(
        "INSERT INTO postback.endpoints (name, kind, url_template) VALUES "
        "('crm', 'webhook', 'https://crm.example/hooks/conversions'), "
        "('warehouse', 'postback', 'https://dwh.example/in?tx={transaction_id}&p={partner}&a={amount}')")


def clicks(conn, count, partners):
    conn.execute("TRUNCATE postback.clicks")
    if count:
        conn.execute(
            "INSERT INTO postback.clicks (click_id, partner, attributes, clicked_at) "
            "SELECT 'k' || g, 'p' || (g %% %s + 1), jsonb_build_object('sub1', 'c' || g, 'aff_id', g %% 977), "
            "now() - interval '1 day' FROM generate_series(1, %s) g", (partners, count))
        conn.execute("VACUUM ANALYZE postback.clicks")


def main():
    c = Cluster.create(settings={"shared_preload_libraries": "''", "shared_buffers": "'1GB'",
                                 "max_wal_size": "'8GB'", "checkpoint_timeout": "'1h'"})
    results = {}
    try:
        c.start()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            conn.execute("CREATE TABLE public.deliveries_copy (LIKE postback.deliveries INCLUDING ALL)")
            print(f"{'scenario':>11} {'rows':>8} {'T_on s':>8} {'T_off s':>8} {'T_rows s':>8} {'on/off':>7} "
                  f"{'on/(off+rows)':>14}", flush=True)
            conn.execute(
                "INSERT INTO postback.endpoints (name, kind, url_template, events) VALUES "
                "('network', 'postback', 'https://network.example/pb?cid={click_id}&tx={transaction_id}"
                "&amount={amount}&cur={currency}&sub1={attributes.sub1}', '{sale}'), "
                "('partner', 'webhook', 'https://partner.example/hooks/conversions', '{sale,lead}'), "
                "('leads-only', 'postback', 'https://other.example/pb?cid={click_id}', '{lead}')")
            for n in SIZES:
                results[f"two_{n}"] = m = measure(conn, PLAIN, n, 2)
                show("two", m)

            t_empty = lifecycle(conn, 0)
            t_history = lifecycle(conn, HISTORY)
            t_plain = lifecycle(conn, HISTORY, triggers=False)
            results["lifecycle"] = {"n": LIFECYCLE_N, "history": HISTORY, "t_empty": t_empty,
                                    "t_history": t_history, "t_plain": t_plain}
            print(f"lifecycle: UPDATE of {LIFECYCLE_N} conversions, 2 endpoints: {t_empty:.3f} s empty, "
                  f"{t_history:.3f} s beside {HISTORY:,} deliveries, {t_plain:.3f} s without our triggers", flush=True)

            results["watch"] = w = watched(conn, BIG)
            print(f"watch: {BIG:,} orders into a watched table {w['t_watch']:.3f} s, the same conversions into "
                  f"postback.conversions {w['t_conv']:.3f} s ({w['t_plain']:.3f} s without ON CONFLICT), the orders alone {w['t_orders']:.3f} s; an UPDATE of "
                  f"{LIFECYCLE_N:,} orders {w['t_update_watch']:.3f} s, of their conversions {w['t_update_conv']:.3f} s",
                  flush=True)

            endpoints(conn, 1)
            clicks(conn, BIG, 1)
            results["partners3"] = m = measure(conn, VIA_CLICK, BIG, 3)
            show("partners3", m)

            endpoints(conn, 1000)
            clicks(conn, BIG, 1000)
            results["partners1k"] = m = measure(conn, VIA_CLICK, BIG, 3)
            show("partners1k", m)

            clicks(conn, 1_000_000, 1000)
            results["clicks1m"] = m = measure(conn, VIA_CLICK, BIG, 3)
            show("clicks1m", m)
            clicks(conn, 0, 1000)
            results["no_clicks"] = m = measure(conn, WITH_PARTNER, BIG, 3, {"partners": 1000})
            show("no clicks", m)

            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('postback.deliveries')), "
                                "pg_total_relation_size('postback.deliveries') / greatest(count(*), 1) "
                                "FROM postback.deliveries").fetchone()
            print(f"deliveries table + indexes: {size[0]} ({size[1]} bytes per delivery)")
    finally:
        c.destroy()

    summary = {
        "fanout_ratio": results[f"two_{BIG}"]["ratio"],
        "fanout_overhead": results[f"two_{BIG}"]["overhead"],
        "fanout_3_endpoints_overhead": results["partners3"]["overhead"],
        "fanout_1000_endpoints_overhead": results["partners1k"]["overhead"],
        "many_partners_overhead_ratio": results["partners1k"]["overhead"] / results["partners3"]["overhead"],
        "clicks_1m_ratio": results["clicks1m"]["t_on"] / results["no_clicks"]["t_on"],
        "lifecycle_history_ratio": results["lifecycle"]["t_history"] / results["lifecycle"]["t_empty"],
        "lifecycle_vs_plain_ratio": results["lifecycle"]["t_history"] / results["lifecycle"]["t_plain"],
        "watch_ratio": results["watch"]["ratio"],
        "watch_vs_plain_ratio": results["watch"]["plain_ratio"],
        "watch_update_ratio": results["watch"]["update_ratio"],
        "rows": BIG,
        "scenarios": results,
    }
    print()
    print(f"fanout_ratio (T_on/T_off, 2 endpoints)          {summary['fanout_ratio']:.2f}   goal <= 3.0")
    print(f"fanout_overhead (T_on/(T_off+T_rows))            {summary['fanout_overhead']:.2f}   goal <= 1.2")
    print(f"fanout_1000_endpoints_overhead                   {summary['fanout_1000_endpoints_overhead']:.2f}   goal <= 1.2")
    print(f"1,000 endpoints ÷ 3 endpoints (overhead)         {summary['many_partners_overhead_ratio']:.2f}   goal <= 1.1")
    print(f"T_on with 1M clicks ÷ T_on without clicks       {summary['clicks_1m_ratio']:.2f}   goal <= 1.15")
    print(f"lifecycle_history_ratio (history ÷ empty)        {summary['lifecycle_history_ratio']:.2f}   goal <= 1.2")
    print(f"lifecycle_vs_plain_ratio (ours ÷ no triggers)    {summary['lifecycle_vs_plain_ratio']:.2f}   goal <= 3.0")
    print(f"watch_ratio (watched table ÷ conversions)        {summary['watch_ratio']:.2f}   goal <= 1.2")
    print(f"watch_vs_plain_ratio (… ÷ without ON CONFLICT)   {summary['watch_vs_plain_ratio']:.2f}")
    print(f"watch_update_ratio (UPDATE, the same)            {summary['watch_update_ratio']:.2f}")
    out = os.path.join(ROOT, "target", "bench")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "enqueue.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
