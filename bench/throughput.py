"""Worker throughput and latency, all from one run against one cluster:

1. ceiling A: a plain keep-alive HTTP client (ureq, same concurrency) against the receiver
2. ceiling B: the worker's own claim-and-record path with no HTTP (the target is an
   address the policy refuses before any connection, so each delivery is claimed,
   judged and recorded exactly as usual)
3. deliveries/s: N conversions inserted in one transaction, timed from its commit to the last recorded delivery
4. commit-to-receipt latency of single committed conversions, p50 / p99
"""

import os
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
from cluster import Cluster, free_port  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
CONCURRENCY = int(os.environ.get("CONCURRENCY", "16"))
TARGET = os.path.join(HERE, "..", "target", "release", "examples")


def wait_done(conn, name, n, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = conn.execute(
            "SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.name = %s AND d.state IN ('succeeded', 'dead')", (name,)).fetchone()[0]
        if done >= n:
            return time.monotonic()
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {name}")


def queued_run(conn, name, url, n):
    """Enqueue n deliveries in one transaction; time from its commit until all are done."""
    conn.execute("INSERT INTO postback.endpoints (name, url_template, events, max_in_flight) VALUES (%s, %s, %s, %s)",
                 (name, url, [name], min(CONCURRENCY, 256)))
    conn.autocommit = False
    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                 "SELECT 'clk-' || g, %s || g, %s FROM generate_series(1, %s) g", (name + "-", name, n))
    started = time.monotonic()
    conn.commit()
    conn.autocommit = True
    return n / (wait_done(conn, name, n) - started)


def main():
    port = free_port()
    receiver = subprocess.Popen([os.path.join(TARGET, "bench_receiver"), str(port)])
    c = Cluster.create(settings={"postback.concurrency": str(CONCURRENCY), "postback.batch_size": "1000",
                                 "shared_buffers": "'1GB'", "max_wal_size": "'8GB'",
                                 "synchronous_commit": "on"})
    try:
        c.start()
        time.sleep(0.3)
        base = f"http://127.0.0.1:{port}"
        plain = float(subprocess.check_output(
            [os.path.join(TARGET, "bench_client"), f"{base}/plain", str(N), str(CONCURRENCY)]).decode())
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            sql_only = queued_run(conn, "sqlonly", f"http://127.0.0.2:{port}/x?c={{click_id}}", N)
            refused = conn.execute("SELECT count(*) FROM postback.deliveries WHERE state = 'dead' "
                                   "AND last_error LIKE '%refused to connect%'").fetchone()[0]
            assert refused == N, refused
            rate = queued_run(conn, "deliver", f"{base}/pb?c={{click_id}}&t={{transaction_id}}", N)
            ok = conn.execute("SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e "
                              "ON e.id = d.endpoint_id WHERE e.name = 'deliver' AND d.state = 'succeeded'").fetchone()[0]
            assert ok == N, ok

            # latency: one conversion per transaction, the worker idle in between
            conn.execute("INSERT INTO postback.endpoints (name, url_template, events) VALUES "
                         "('latency', %s, '{latency}')", (f"{base}/lat?t={{transaction_id}}",))
            urllib.request.urlopen(f"{base}/__reset").read()
            committed = {}
            for i in range(300):
                with conn.transaction():
                    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                                 "VALUES ('c', %s, 'latency')", (f"lat{i}",))
                    committed[f"lat{i}"] = time.time()
                time.sleep(0.01)
            wait_done(conn, "latency", 300)
        arrivals = urllib.request.urlopen(f"{base}/__arrivals").read().decode().splitlines()
        lat = []
        for line in arrivals:
            micros, target = line.split(" ", 1)
            if target.startswith("/lat?t="):
                lat.append((int(micros) / 1e6 - committed[target.split("=", 1)[1]]) * 1000)
        lat.sort()
        p50 = statistics.median(lat)
        p99 = lat[int(len(lat) * 0.99) - 1]
        print(f"deliveries: {N}, concurrency: {CONCURRENCY}")
        print(f"plain keep-alive client:      {plain:10.0f} requests/s")
        print(f"claim-and-record, no HTTP:    {sql_only:10.0f} deliveries/s")
        print(f"worker, real HTTP:            {rate:10.0f} deliveries/s "
              f"({rate / min(plain, sql_only):.2f} of the lower ceiling)")
        print(f"commit-to-receipt latency:    p50 {p50:.2f} ms, p99 {p99:.2f} ms ({len(lat)} samples)")
    finally:
        c.destroy()
        receiver.terminate()


if __name__ == "__main__":
    main()
