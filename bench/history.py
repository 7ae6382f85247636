"""History beside the present; writes target/bench/history.json.

usage: python3 bench/history.py [--quick]

Its own cluster (one worker, the settings of bench/run.py) and loopback receiver.
First, with an empty history: 20,000 deliveries to one endpoint (max_in_flight 64),
timed from their commit until all are settled, and the operator views timed. Then a
history is written directly (triggers off, as a restore would): H finished deliveries
of H/2 conversions over 100 endpoints, completed over the last 30 days (1% dead), three
attempts each, rolled up as the worker does; then the same delivery run and the same
view timings. H is 10M (30M attempts) in the full run and 1M in --quick.

history_ratio = deliveries/s with the history ÷ with none (goal >= 0.9); each view's
time is the best of three runs of what an operator types (goal <= 200 ms), and so is each
query postgres_exporter runs from contrib/prometheus/queries.yaml. Retention:
postback.purge removing 20,000 finished deliveries (and their attempts) from the empty
history's run, then 20,000 from beside the history: purge_history_ratio = time per row
removed beside the history ÷ without it (retention costs what it removes, not the table).
"""

import os
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from cluster import Cluster, free_port  # noqa: E402
import figures  # noqa: E402
from figures import step  # noqa: E402

QUICK = "--quick" in sys.argv
HISTORY = 1_000_000 if QUICK else 10_000_000
N = 20_000
TARGET = os.path.join(ROOT, "target", "release", "examples")
VIEWS = {
    "endpoint_health_ms": "SELECT * FROM postback.endpoint_health",
    "metrics_ms": "SELECT * FROM postback.metrics",
    "dead_letters_ms": "SELECT * FROM postback.dead_letters ORDER BY died_at DESC LIMIT 20",
    "match_rate_ms": "SELECT * FROM postback.match_rate",
}
# what postgres_exporter runs at each scrape (contrib/prometheus/queries.yaml)
with open(os.path.join(ROOT, "contrib", "prometheus", "queries.yaml")) as _f:
    for _name, _spec in yaml.safe_load(_f).items():
        VIEWS[f"exporter_{_name.removeprefix('pg_postback_')}_ms"] = _spec["query"]



def run(conn, name, url):
    """N deliveries to one endpoint: deliveries/s from commit until all settle."""
    conn.execute("INSERT INTO postback.endpoints (name, url_template, events, max_in_flight) "
                 "VALUES (%s, %s, ARRAY[%s], 64)", (name, url, name))
    eid = conn.execute("SELECT id FROM postback.endpoints WHERE name = %s", (name,)).fetchone()[0]
    conn.autocommit = False
    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                 "SELECT 'c' || g, %s || '-' || g, %s FROM generate_series(1, %s) g", (name, name, N))
    conn.commit()
    conn.autocommit = True
    committed = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    while conn.execute("SELECT count(*) FROM postback.deliveries WHERE endpoint_id = %s "
                       "AND state IN ('pending', 'in_flight')", (eid,)).fetchone()[0] > 0:
        time.sleep(0.1)
    last = conn.execute("SELECT max(completed_at) FROM postback.deliveries WHERE endpoint_id = %s",
                        (eid,)).fetchone()[0]
    return N / (last - committed).total_seconds()


def view_times(conn):
    out = {}
    for key, sql in VIEWS.items():
        best = None
        for _ in range(3):
            started = time.monotonic()
            conn.execute(sql).fetchall()
            took = (time.monotonic() - started) * 1000
            best = took if best is None else min(best, took)
        out[key] = best
    return out


def purge_us_per_row(conn):
    """One postback.purge batch of 20,000 finished deliveries: µs per delivery or attempt removed."""
    count = "SELECT (SELECT count(*) FROM postback.deliveries) + (SELECT count(*) FROM postback.attempts)"
    before = conn.execute(count).fetchone()[0]
    started = time.monotonic()
    conn.execute("SELECT postback.purge(interval '0', 20000, false, 1)")
    took = time.monotonic() - started
    removed = before - conn.execute(count).fetchone()[0]
    return took * 1e6 / max(removed, 1)


def write_history(conn, h):
    """h finished deliveries, h/2 conversions, 3 attempts each, over 30 days."""
    conn.execute("INSERT INTO postback.endpoints (name, url_template, events) "
                 "SELECT 'old' || g, 'http://127.0.0.1:9/old?t={transaction_id}', ARRAY['old'] "
                 "FROM generate_series(1, 100) g")
    conn.execute("SET session_replication_role = replica")  # no triggers: written as a restore writes
    first = conn.execute("SELECT min(id) FROM postback.endpoints WHERE name LIKE 'old%'").fetchone()[0]
    conversions = h // 2
    base = conn.execute("SELECT coalesce(max(id), 0) FROM postback.conversions").fetchone()[0]
    conn.execute(
        "INSERT INTO postback.conversions (id, click_id, transaction_id, event, status, created_at, occurred_at) "
        "SELECT %s + g, 'oc' || g, 'old-' || g, 'old', "
        "       CASE WHEN g %% 20 = 0 THEN 'reversed' ELSE 'approved' END, "
        "       now() - interval '30 days' + (g::float8 / %s) * interval '30 days' - interval '1 hour', "
        "       now() - interval '30 days' + (g::float8 / %s) * interval '30 days' - interval '1 hour' "
        "FROM generate_series(1, %s) g", (base, conversions, conversions, conversions))
    conn.execute(
        "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, "
        "  state, attempts, created_at, next_attempt_at, completed_at, last_error) "
        "SELECT %s + (g %% 100), %s + (g + 1) / 2, 'old', 'approved', 'old.' || g, 'GET', "
        "       'http://127.0.0.1:9/old?t=' || g, CASE WHEN g %% 100 = 0 THEN 'dead' ELSE 'succeeded' END, 3, t, t, "
        "       t + interval '2 seconds', CASE WHEN g %% 100 = 0 THEN 'HTTP 500' END "
        "FROM generate_series(1, %s) g, "
        "     LATERAL (SELECT now() - interval '30 days' + (g::float8 / %s) * interval '30 days' "
        "                     - interval '1 hour' AS t) x", (first, base, h, h))
    conn.execute(
        "INSERT INTO postback.attempts (delivery_id, attempt_no, started_at, duration_ms, status_code, outcome) "
        "SELECT d.id, n, d.created_at + n * interval '500 milliseconds', 1.5, CASE WHEN n < 3 THEN 503 ELSE 200 END, "
        "       CASE WHEN n < 3 THEN 'retry' ELSE d.state END "
        "FROM postback.deliveries d, generate_series(1, 3) n WHERE d.event = 'old'")
    conn.execute("SET session_replication_role = origin")
    conn.execute("SELECT setval(pg_get_serial_sequence('postback.conversions', 'id'), "
                 "(SELECT max(id) FROM postback.conversions))")


def main():
    results = {"history_deliveries": HISTORY, "history_attempts": 3 * HISTORY}
    port = free_port()
    receiver = subprocess.Popen([os.path.join(TARGET, "bench_receiver"), str(port)])
    c = Cluster.create(settings={"postback.concurrency": "1024", "postback.batch_size": "1000",
                                 "shared_buffers": "'1GB'", "max_wal_size": "'16GB'", "synchronous_commit": "on",
                                 "postback.breaker_failures": "0", "maintenance_work_mem": "'512MB'"})
    try:
        c.start()
        base = f"http://127.0.0.1:{port}"
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            time.sleep(1)
            step(f"empty history: {N} deliveries to one endpoint")
            results["dps_empty"] = run(conn, "fresh", f"{base}/fresh?t={{transaction_id}}")
            empty = view_times(conn)
            results["purge_empty_us_per_row"] = purge_us_per_row(conn)
            step(f"writing a history of {HISTORY:,} finished deliveries and {3 * HISTORY:,} attempts")
            started = time.monotonic()
            write_history(conn, HISTORY)
            conn.execute("VACUUM ANALYZE")
            while conn.execute("SELECT postback.roll_up('30 days')").fetchone()[0]:
                pass
            results["history_write_s"] = time.monotonic() - started
            # the history was written in minutes, not over 30 days: its dirty pages are
            # flushed before the present is measured, as they would have been long ago
            conn.execute("CHECKPOINT")
            size = conn.execute("SELECT pg_total_relation_size('postback.deliveries') + "
                                "pg_total_relation_size('postback.attempts')").fetchone()[0]
            results["history_gib"] = size / 2**30
            step(f"with the history ({results['history_gib']:.1f} GiB): {N} deliveries to one endpoint")
            results["dps_history"] = run(conn, "present", f"{base}/present?t={{transaction_id}}")
            results["history_ratio"] = results["dps_history"] / results["dps_empty"]
            for key, ms in view_times(conn).items():
                results[key] = ms
                results[key.replace("_ms", "_empty_ms")] = empty[key]
            results["purge_history_us_per_row"] = purge_us_per_row(conn)
            results["purge_history_ratio"] = results["purge_history_us_per_row"] / results["purge_empty_us_per_row"]
    finally:
        c.destroy()
        receiver.terminate()
    figures.write("history.json", results)


if __name__ == "__main__":
    main()
