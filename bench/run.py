"""Every headline figure in one run, measured side by side; writes target/bench/summary.json.

usage: python3 bench/run.py [--quick]

Starts its own throwaway preloaded cluster and loopback receivers (the release build
must be installed: `make bench` / `make bench-quick` do it). The enqueue figures come
from bench/enqueue.py, run first in its own cluster without the worker; the many-slow-
partners figures from bench/slow_partners.py, in its own cluster with default settings;
one worker beside two from bench/workers.py, in its own cluster; history beside the
present (delivery rate and view timings with 10M finished deliveries, 1M in --quick)
from bench/history.py, in its own cluster.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from cluster import Cluster, free_port  # noqa: E402
from receiver import Hanging  # noqa: E402

QUICK = "--quick" in sys.argv
QUICK_ARGS = ["--quick"] if QUICK else []
CONCURRENCY = int(os.environ.get("CONCURRENCY", "64"))
N = 10_000 if QUICK else 20_000
DEPTH = 100_000 if QUICK else 1_000_000
TARGET = os.path.join(ROOT, "target", "release", "examples")
GOALS = {
    "e2e_ratio": (">=", 0.7), "e2e_dps": (">=", 20000), "latency_p50_ms": ("<=", 2), "latency_p99_ms": ("<=", 10),
    "fanout_ratio": ("<=", 3.0), "fanout_overhead": ("<=", 1.2), "fanout_1000_endpoints_overhead": ("<=", 1.2),
    "noisy_drain_ratio": ("<=", 1.5), "noisy_p99_ms": ("<=", 50), "many_endpoints_ratio": (">=", 0.8),
    "depth_ratio": ("<=", 1.2), "worker_rss_mib": ("<=", 64),
    "lifecycle_history_ratio": ("<=", 1.2), "lifecycle_vs_plain_ratio": ("<=", 3.0), "watch_ratio": ("<=", 1.2),
    "noisy_many_ratio": ("<=", 1.5), "noisy_many_p99_added_ms": ("<=", 50), "open_requests_rss_mib": ("<=", 64),
    "workers_ratio": (">=", 1.5), "e2e_dps_2_workers": (">=", 20000), "history_ratio": (">=", 0.9),
    "endpoint_health_ms": ("<=", 200), "metrics_ms": ("<=", 200), "dead_letters_ms": ("<=", 200),
    "match_rate_ms": ("<=", 200), "purge_history_ratio": ("<=", 1.5), "exporter_endpoint_ms": ("<=", 200),
    "exporter_deliveries_ms": ("<=", 200), "exporter_worker_ms": ("<=", 200),
}


def step(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def settled(conn, ids):
    # by endpoint id: a join by name over freshly added endpoints (no statistics yet)
    # can become a nested loop that costs the machine more than the worker does
    return conn.execute("SELECT count(*) FROM postback.deliveries WHERE endpoint_id = ANY (%s) "
                        "AND state IN ('succeeded', 'dead')", (ids,)).fetchone()[0]


def wait_settled(conn, name, n, timeout=600):
    ids = [r[0] for r in conn.execute("SELECT id FROM postback.endpoints WHERE name LIKE %s", (name,))]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if settled(conn, ids) >= n:
            return time.monotonic()
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {n} deliveries of {name}")


def endpoint(conn, name, url, **options):
    cols = ["name", "url_template", "events", "max_in_flight"] + list(options)
    vals = [name, url, [name], min(CONCURRENCY, 256)] + list(options.values())
    conn.execute(f"INSERT INTO postback.endpoints ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(vals))})", vals)


def queued_run(conn, name, url, n, **options):
    """n deliveries enqueued in one transaction; deliveries/s from its commit until all settle."""
    endpoint(conn, name, url, **options)
    conn.autocommit = False
    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                 "SELECT 'clk-' || g, %s || g, %s FROM generate_series(1, %s) g", (name + "-", name, n))
    started = time.monotonic()
    conn.commit()
    conn.autocommit = True
    return n / (wait_settled(conn, name, n) - started)


def arrivals(base):
    lines = urllib.request.urlopen(f"{base}/__arrivals").read().decode().splitlines()
    return [(int(m) / 1e6, t) for m, t in (line.split(" ", 1) for line in lines)]


def latency_run(conn, base, name, count, gap=0.01):
    """Single conversions at a steady rate; commit-to-receipt latencies in ms."""
    endpoint(conn, name, f"{base}/{name}?t={{transaction_id}}")
    committed = {}
    for i in range(count):
        with conn.transaction():
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c', %s, %s)",
                         (f"{name}{i}", name))
            committed[f"{name}{i}"] = time.time()
        time.sleep(gap)
    wait_settled(conn, name, count)
    lat = sorted((t - committed[p.split("=", 1)[1]]) * 1000 for t, p in arrivals(base) if p.startswith(f"/{name}?t="))
    return lat


def pct(values, p):
    return values[min(len(values) - 1, int(len(values) * p))]


class RssSampler:
    """The worker's peak private memory (RssAnon: its own heap and stacks, not the
    shared buffers it maps), sampled every 200 ms for the whole run."""

    def __init__(self, cluster):
        self.cluster, self.peak_kib, self.stop = cluster, 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        pid = None
        while not self.stop.wait(0.2):
            try:
                if pid is None:
                    with self.cluster.connect() as conn:
                        row = conn.execute("SELECT pid FROM pg_stat_activity "
                                           "WHERE backend_type = 'pg_postback worker'").fetchone()
                        pid = row[0] if row else None
                    continue
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except Exception:
                pid = None

    def peak_mib(self):
        self.stop.set()
        return self.peak_kib / 1024


def sub_bench(script, args, written, keys):
    """Runs a benchmark script of its own cluster; the figures `keys` from the JSON it writes."""
    subprocess.run([sys.executable, os.path.join(HERE, script)] + args, check=True)
    with open(os.path.join(ROOT, "target", "bench", written)) as f:
        figures = json.load(f)
    return {key: figures[key] for key in keys}


def main():
    results, settings = {}, {"concurrency": CONCURRENCY, "batch_size": 1000, "deliveries": N, "quick": QUICK}
    step("enqueue (bench/enqueue.py, its own cluster without the worker)")
    results.update(sub_bench("enqueue.py", ["20000"] if QUICK else ["10000", "100000"], "enqueue.json", (
        "fanout_ratio", "fanout_overhead", "fanout_1000_endpoints_overhead", "many_partners_overhead_ratio",
        "clicks_1m_ratio", "lifecycle_history_ratio", "lifecycle_vs_plain_ratio", "watch_ratio")))
    step("many slow partners and 1,000 open requests (bench/slow_partners.py, its own cluster, defaults)")
    results.update(sub_bench("slow_partners.py", QUICK_ARGS, "slow.json", (
        "noisy_many_ratio", "noisy_many_p99_added_ms", "open_requests_rss_mib", "worker_threads_at_open_requests")))
    step("one worker beside two over 100 endpoints (bench/workers.py, its own cluster)")
    results.update(sub_bench("workers.py", QUICK_ARGS, "workers.json", (
        "ceiling_dps_1_workers", "ceiling_dps_2_workers", "workers_ratio", "e2e_dps_1_workers",
        "e2e_dps_2_workers", "e2e_workers_ratio", "e2e_dps_one_endpoint_2_workers")))
    step("history beside the present (bench/history.py, its own cluster)")
    results.update(sub_bench("history.py", QUICK_ARGS, "history.json", (
        "history_deliveries", "dps_empty", "dps_history", "history_ratio", "endpoint_health_ms",
        "metrics_ms", "dead_letters_ms", "match_rate_ms", "purge_history_ratio", "exporter_endpoint_ms",
        "exporter_deliveries_ms", "exporter_worker_ms")))
    step("the 0.2.0 -> 0.3.0 update beside 1M deliveries and a writer (bench/upgrade.py, its own cluster)")
    results.update(sub_bench("upgrade.py", [], "upgrade.json", (
        "update_s", "update_stall_ms", "insert_max_before_ms", "upgrade_rows_kept")))

    port = free_port()
    receiver = subprocess.Popen([os.path.join(TARGET, "bench_receiver"), str(port)])
    hanging = Hanging().start()
    c = Cluster.create(settings={"postback.concurrency": str(CONCURRENCY), "postback.batch_size": "1000",
                                 "shared_buffers": "'1GB'", "max_wal_size": "'8GB'", "synchronous_commit": "on",
                                 "postback.breaker_failures": "0"})
    try:
        c.start()
        rss = RssSampler(c)
        time.sleep(0.3)
        base = f"http://127.0.0.1:{port}"
        step(f"plain keep-alive client, {N} requests, concurrency {CONCURRENCY}")
        results["raw_rps"] = float(subprocess.check_output(
            [os.path.join(TARGET, "bench_client"), f"{base}/plain", str(N), str(CONCURRENCY)]).decode())
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            step("claim-and-record with no HTTP (a target the address policy refuses)")
            results["db_ceiling_dps"] = queued_run(conn, "sqlonly", f"http://127.0.0.2:{port}/x?c={{click_id}}", N)
            step("worker with real HTTP")
            results["e2e_dps"] = queued_run(conn, "deliver", f"{base}/pb?c={{click_id}}&t={{transaction_id}}", N)
            results["e2e_ratio"] = results["e2e_dps"] / min(results["raw_rps"], results["db_ceiling_dps"])
            step("20% of requests answered 500 once")
            retry_dps = queued_run(conn, "retry", f"{base}/fail20?t={{transaction_id}}", N,
                                   retry_schedule=["1 millisecond"])
            results["e2e_retry_ratio"] = retry_dps / results["e2e_dps"]

            step("commit-to-receipt latency, single conversions every 10 ms")
            urllib.request.urlopen(f"{base}/__reset").read()
            lat = latency_run(conn, base, "lat", 300 if QUICK else 1000)
            results["latency_p50_ms"] = statistics.median(lat)
            results["latency_p95_ms"] = pct(lat, 0.95)
            results["latency_p99_ms"] = pct(lat, 0.99)

            step("noisy neighbour: 2,000 to a fast receiver alone, then beside 200 to a hanging one")
            alone = 2000 / queued_run(conn, "alone", f"{base}/alone?t={{transaction_id}}", 2000)
            endpoint(conn, "hang", hanging.url("/h?t={transaction_id}"), timeout="10 seconds")
            conn.execute("UPDATE postback.endpoints SET max_in_flight = 8 WHERE name = 'hang'")
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                         "SELECT 'c', 'hang-' || g, 'hang' FROM generate_series(1, 200) g")
            time.sleep(0.5)
            beside = 2000 / queued_run(conn, "beside", f"{base}/beside?t={{transaction_id}}", 2000)
            results["noisy_drain_ratio"] = beside / alone
            urllib.request.urlopen(f"{base}/__reset").read()
            noisy = latency_run(conn, base, "noisy", 200)
            results["noisy_p99_ms"] = pct(noisy, 0.99)
            conn.execute("UPDATE postback.endpoints SET active = false WHERE name = 'hang'")

            step("many endpoints: 20,000 deliveries over 1,000 endpoints vs one")
            many = 20_000 if not QUICK else 10_000
            one = queued_run(conn, "one", f"{base}/one?t={{transaction_id}}", many)
            conn.execute(
                "INSERT INTO postback.endpoints (name, url_template, events, max_in_flight) "
                "SELECT 'm' || g, %s || g || '?t={transaction_id}', '{many}', 8 FROM generate_series(1, 1000) g",
                (f"{base}/m",))
            conn.autocommit = False
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                         "SELECT 'c', 'many-' || g, 'many' FROM generate_series(1, %s) g", (many // 1000,))
            started = time.monotonic()
            conn.commit()
            conn.autocommit = True
            spread = many / (wait_settled(conn, "m%", many) - started)
            results["many_endpoints_ratio"] = spread / one

            step(f"queue depth: 1,000 due deliveries beside 1,000 vs {DEPTH:,} not yet due")
            small = queued_run(conn, "depth_small", f"{base}/ds?t={{transaction_id}}", 1000)
            endpoint(conn, "later", f"{base}/later?t={{transaction_id}}")
            conn.execute(
                "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, "
                "url, next_attempt_at) SELECT e.id, NULL, 'later', 'approved', 'depth.' || g, 'GET', %s, "
                "now() + interval '1 day' FROM postback.endpoints e, generate_series(1, %s) g WHERE e.name = 'later'",
                (f"{base}/later", DEPTH))
            conn.execute("VACUUM ANALYZE postback.deliveries")
            deep = queued_run(conn, "depth_deep", f"{base}/dd?t={{transaction_id}}", 1000)
            results["depth_ratio"] = small / deep
            results["worker_rss_mib"] = rss.peak_mib()
    finally:
        c.destroy()
        receiver.terminate()
        hanging.stop()

    summary = {**results, "settings": settings}
    out = os.path.join(ROOT, "target", "bench")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print(f"{'figure':<34} {'value':>12}   goal")
    for key, value in results.items():
        goal = GOALS.get(key)
        mark = ""
        if goal and value is not None:
            ok = value >= goal[1] if goal[0] == ">=" else value <= goal[1]
            mark = f"{goal[0]} {goal[1]}  {'met' if ok else 'MISSED'}"
        print(f"{key:<34} {value:>12.2f}   {mark}")
    print(f"\nwrote {os.path.join('target', 'bench', 'summary.json')}")


if __name__ == "__main__":
    main()
