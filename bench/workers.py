"""One worker beside two, in one cluster; writes target/bench/workers.json.

usage: python3 bench/workers.py [--quick]

Its own cluster (same settings as bench/run.py) and loopback receiver. Over 100
endpoints (max_in_flight 64 each), N deliveries enqueued in one transaction, timed from
its commit until every one is settled: first with no HTTP (a target the address policy
refuses: what claiming and recording alone cost, the ceiling), then with real HTTP; each
with postback.workers = 1, then reloaded to 2 (the launcher stops the one worker and starts
two). Also one hot endpoint with 2 workers (one owner: the figure to expect for a single
partner) and, for the record, which processes used the CPU (`perf` is the profiler; this
prints only the split by process from /proc).
"""

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from cluster import Cluster, free_port  # noqa: E402
import figures  # noqa: E402
from figures import step  # noqa: E402

QUICK = "--quick" in sys.argv
N = 40_000 if QUICK else 100_000
ENDPOINTS = 100
TARGET = os.path.join(ROOT, "target", "release", "examples")



def worker_pids(conn):
    return [r[0] for r in conn.execute("SELECT pid FROM postback.worker_status() "
                                       "WHERE database = current_database() AND role = 'delivery' AND running")]


def set_workers(c, conn, n):
    conn.execute(f"ALTER SYSTEM SET postback.workers = '{n}'")
    conn.execute("SELECT pg_reload_conf()")
    c.wait_for(lambda: len(worker_pids(conn)) == n and all(
        r[0] == "delivering" for r in conn.execute("SELECT state FROM postback.worker_status() "
                                                   "WHERE database = current_database() AND role = 'delivery'")),
        timeout=30, what=f"{n} workers")
    time.sleep(0.5)


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def run(conn, name, url, n, endpoints=ENDPOINTS):
    """n deliveries over `endpoints` endpoints: deliveries/s from commit until all settle."""
    conn.execute(
        "INSERT INTO postback.endpoints (name, url_template, events, max_in_flight) "
        "SELECT %s || g, %s, ARRAY[%s], 64 FROM generate_series(1, %s) g", (name, url, name, endpoints))
    ids = [r[0] for r in conn.execute("SELECT id FROM postback.endpoints WHERE %s = ANY (events)", (name,))]
    conn.autocommit = False
    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                 "SELECT 'c' || g, %s || '-' || g, %s FROM generate_series(1, %s) g", (name, name, n // endpoints))
    pids = worker_pids(conn)
    ticks = cpu_ticks(pids)
    started = time.monotonic()
    conn.commit()
    conn.autocommit = True
    committed = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    total = (n // endpoints) * endpoints
    # looked at every 100 ms (a count over the run's deliveries takes a core's time
    # the workers need); the figure comes from the last completed_at, not from the poll
    while conn.execute("SELECT count(*) FROM postback.deliveries WHERE endpoint_id = ANY (%s) "
                       "AND state IN ('succeeded', 'dead')", (ids,)).fetchone()[0] < total:
        time.sleep(0.1)
    busy = (cpu_ticks(pids) - ticks) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - started)
    last = conn.execute("SELECT max(completed_at) FROM postback.deliveries WHERE endpoint_id = ANY (%s)",
                        (ids,)).fetchone()[0]
    return total / (last - committed).total_seconds(), busy


def main():
    results = {}
    port = free_port()
    receiver = subprocess.Popen([os.path.join(TARGET, "bench_receiver"), str(port)])
    c = Cluster.create(settings={"postback.concurrency": "1024", "postback.batch_size": "1000",
                                 "shared_buffers": "'1GB'", "max_wal_size": "'8GB'", "synchronous_commit": "on",
                                 "postback.breaker_failures": "0", "postback.workers": "1"})
    try:
        c.start()
        base = f"http://127.0.0.1:{port}"
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            for workers in (1, 2):
                set_workers(c, conn, workers)
                step(f"{workers} worker(s): claim-and-record, no HTTP, {N} deliveries over {ENDPOINTS} endpoints")
                dps, busy = run(conn, f"sql{workers}_", f"http://127.0.0.2:{port}/x?c={{click_id}}", N)
                results[f"ceiling_dps_{workers}_workers"] = dps
                results[f"ceiling_worker_cpu_{workers}_workers"] = busy
                step(f"{workers} worker(s): real HTTP, {N} deliveries over {ENDPOINTS} endpoints")
                dps, busy = run(conn, f"http{workers}_", f"{base}/w{workers}?c={{click_id}}&t={{transaction_id}}", N)
                results[f"e2e_dps_{workers}_workers"] = dps
                results[f"e2e_worker_cpu_{workers}_workers"] = busy
                print(f"    ceiling {results[f'ceiling_dps_{workers}_workers']:,.0f}/s, e2e {dps:,.0f}/s "
                      f"(workers' CPU {busy:.2f} cores)", flush=True)
            step(f"2 workers: one hot endpoint, {N} deliveries")
            results["e2e_dps_one_endpoint_2_workers"], _ = run(conn, "hot", f"{base}/hot?t={{transaction_id}}", N, 1)
        results["workers_ratio"] = results["ceiling_dps_2_workers"] / results["ceiling_dps_1_workers"]
        results["e2e_workers_ratio"] = results["e2e_dps_2_workers"] / results["e2e_dps_1_workers"]
    finally:
        c.destroy()
        receiver.terminate()
    figures.write("workers.json", results)


if __name__ == "__main__":
    main()
