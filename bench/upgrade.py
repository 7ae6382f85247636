"""The 0.2.0 -> 0.3.0 update beside a 1M-row history; writes target/bench/upgrade.json.

usage: python3 bench/upgrade.py [--quick]

Its own cluster. pg_postback 0.2.0 with H finished deliveries (H/2 conversions, three
attempts each, written as a restore writes them; H = 1M, 200k in --quick), then
`ALTER EXTENSION pg_postback UPDATE` while another session inserts one conversion
per statement without pause. Measured in one run:

- update_s: how long the update's transaction takes;
- update_stall_ms: the longest a conversion insert waited during it, beside the
  longest before the update (insert_max_before_ms): what an application feels;
- upgrade_locked: the relations the update holds in ACCESS EXCLUSIVE or SHARE mode
  until it commits (printed; what blocks writers meanwhile);
- rows kept: conversions, deliveries and attempts counted before and after (must equal).
"""

import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from cluster import Cluster  # noqa: E402
import figures  # noqa: E402
from figures import step  # noqa: E402

QUICK = "--quick" in sys.argv
HISTORY = 200_000 if QUICK else 1_000_000
COUNTS = ("SELECT (SELECT count(*) FROM postback.conversions), (SELECT count(*) FROM postback.deliveries), "
          "(SELECT count(*) FROM postback.attempts), "
          "(SELECT count(*) FROM postback.deliveries WHERE state = 'pending')")


def write_history(conn, h):
    """h deliveries (h/100 still pending, 1% dead), h/2 conversions, 3 attempts per finished one."""
    conn.execute("INSERT INTO postback.endpoints (name, url_template, events) "
                 "SELECT 'old' || g, 'http://127.0.0.1:9/old?t={transaction_id}', ARRAY['old'] "
                 "FROM generate_series(1, 100) g")
    first = conn.execute("SELECT min(id) FROM postback.endpoints").fetchone()[0]
    conn.execute("SET session_replication_role = replica")
    conn.execute(
        "INSERT INTO postback.conversions (click_id, transaction_id, event, created_at) "
        "SELECT 'oc' || g, 'old-' || g, 'old', now() - interval '30 days' + (g::float8 / %s) * interval '30 days' "
        "FROM generate_series(1, %s) g", (h // 2, h // 2))
    conn.execute(
        "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, "
        "  state, attempts, created_at, next_attempt_at, completed_at) "
        "SELECT %s + (g %% 100), (g + 1) / 2, 'old', 'approved', 'old.' || g, 'GET', 'http://127.0.0.1:9/old?t=' || g, "
        "       s, 3, t, t + interval '1 year', CASE WHEN s <> 'pending' THEN t + interval '2 seconds' END "
        "FROM generate_series(1, %s) g, "
        "     LATERAL (SELECT now() - interval '30 days' + (g::float8 / %s) * interval '30 days' AS t, "
        "                     CASE WHEN g %% 100 = 0 THEN 'dead' WHEN g %% 100 = 1 THEN 'pending' "
        "                          ELSE 'succeeded' END AS s) x", (first, h, h))
    conn.execute(
        "INSERT INTO postback.attempts (delivery_id, attempt_no, started_at, duration_ms, status_code, outcome) "
        "SELECT d.id, n, d.created_at + n * interval '500 milliseconds', 1.5, CASE WHEN n < 3 THEN 503 ELSE 200 END, "
        "       CASE WHEN n < 3 THEN 'retry' ELSE d.state END "
        "FROM postback.deliveries d, generate_series(1, 3) n WHERE d.state <> 'pending'")
    conn.execute("SET session_replication_role = origin")
    conn.execute("SELECT setval(pg_get_serial_sequence('postback.conversions', 'id'), "
                 "(SELECT max(id) FROM postback.conversions))")
    conn.execute("VACUUM ANALYZE")


class Inserter(threading.Thread):
    """One conversion per statement, as an application writes them; keeps each one's time."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.times = []  # (started monotonic, took s)
        self.stop = threading.Event()

    def run(self):
        with self.cluster.connect() as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                started = time.monotonic()
                conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                             "VALUES ('live', %s, 'live')", (f"live-{n}",))
                self.times.append((started, time.monotonic() - started))

    def worst(self, since, until):
        took = [t for s, t in self.times if since <= s + t and s <= until]
        return max(took) * 1000 if took else 0.0


def main():
    results = {"upgrade_history": HISTORY}
    c = Cluster.create(settings={"shared_buffers": "'512MB'", "max_wal_size": "'8GB'",
                                 "maintenance_work_mem": "'256MB'"})
    try:
        c.start()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback VERSION '0.2.0'")
            step(f"0.2.0 with {HISTORY:,} deliveries and {3 * HISTORY:,} attempts")
            write_history(conn, HISTORY)
            before = conn.execute(COUNTS).fetchone()
            inserter = Inserter(c)
            inserter.start()
            time.sleep(2)
            quiet_since = time.monotonic() - 2
            step("ALTER EXTENSION pg_postback UPDATE beside one inserting session")
            conn.autocommit = False
            started = time.monotonic()
            conn.execute("ALTER EXTENSION pg_postback UPDATE TO '0.3.0'")
            locked = conn.execute(
                "SELECT string_agg(DISTINCT format('%s (%s)', c.relname, l.mode), ', ') "
                "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE l.pid = pg_backend_pid() AND l.mode IN ('AccessExclusiveLock', 'ShareLock', 'ExclusiveLock') "
                "AND c.relkind IN ('r', 'p') AND c.relnamespace = 'postback'::regnamespace").fetchone()[0]
            conn.commit()
            ended = time.monotonic()
            conn.autocommit = True
            time.sleep(1)
            inserter.stop.set()
            inserter.join()
            live = sum(1 for s, _ in inserter.times)
            after = conn.execute(COUNTS).fetchone()
            results["update_s"] = ended - started
            results["update_stall_ms"] = inserter.worst(started, ended)
            results["insert_max_before_ms"] = inserter.worst(quiet_since, started)
            results["upgrade_rows_kept"] = float(after[1] == before[1] and after[2] == before[2]
                                                 and after[0] >= before[0] and after[3] >= before[3])
            print(f"held until commit: {locked}")
            print(f"before: {before}, after (plus {live} live inserts): {after}")
    finally:
        c.destroy()
    figures.write("upgrade.json", results)


if __name__ == "__main__":
    main()
