"""Many partners slow at once, and what many open requests cost; writes target/bench/slow.json.

usage: python3 bench/slow_partners.py [--quick]

Its own cluster with the worker's default settings (concurrency, breaker, endpoint
defaults: max_in_flight 8, timeout 10 s). For 10, 50 and 200 slow partners (half answer
after 5 s, half never answer), each with a backlog that keeps it busy, one fast partner
drains 4,000 deliveries; the figure is that drain's time beside them ÷ alone (measured
just before, on the same history), and the
commit-to-receipt p99 of single conversions beside them minus alone. Then, in a
cluster of its own: 1,000 endpoints × 1 request to a partner that never answers, the
worker's private memory (RssAnon) and its thread count while they are all open.
"""

import os
import subprocess
import sys
import time
import urllib.request

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from cluster import Cluster, free_port  # noqa: E402
import figures  # noqa: E402
from figures import step  # noqa: E402
from receiver import Hanging  # noqa: E402

QUICK = "--quick" in sys.argv
TARGET = os.path.join(ROOT, "target", "release", "examples")
FAST_N = 4000



def ids_of(conn, pattern):
    return [r[0] for r in conn.execute("SELECT id FROM postback.endpoints WHERE name LIKE %s", (pattern,))]


def wait_settled(conn, pattern, n, timeout=float(os.environ.get("SLOW_TIMEOUT", "120"))):
    """When all n settled; None if they did not within the timeout (a stall)."""
    ids = ids_of(conn, pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = conn.execute("SELECT count(*) FROM postback.deliveries WHERE endpoint_id = ANY (%s) "
                            "AND state IN ('succeeded', 'dead')", (ids,)).fetchone()[0]
        if done >= n:
            return time.monotonic()
        time.sleep(0.005)
    print(f"    not all {n} deliveries of {pattern} settled within {timeout} s", flush=True)
    return None


def drain(conn, name, url, n=FAST_N):
    """n deliveries to a fresh fast endpoint (default settings), enqueued in one
    transaction: seconds from commit until all settle."""
    conn.execute("INSERT INTO postback.endpoints (name, url_template, events) VALUES (%s, %s, %s)",
                 (name, url, [name]))
    with conn.transaction():
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                     "SELECT 'c', %s || g, %s FROM generate_series(1, %s) g", (name + "-", name, n))
        started = time.monotonic()
    settled = wait_settled(conn, name, n)
    return float("inf") if settled is None else settled - started


def arrivals(base):
    lines = urllib.request.urlopen(f"{base}/__arrivals").read().decode().splitlines()
    return [(int(m) / 1e6, t) for m, t in (line.split(" ", 1) for line in lines)]


def latency_p99(conn, base, name, count):
    """Single conversions every 10 ms to a fresh fast endpoint: commit-to-receipt p99, ms."""
    conn.execute("INSERT INTO postback.endpoints (name, url_template, events) VALUES (%s, %s, %s)",
                 (name, f"{base}/{name}?t={{transaction_id}}", [name]))
    committed = {}
    for i in range(count):
        with conn.transaction():
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c', %s, %s)",
                         (f"{name}{i}", name))
            committed[f"{name}{i}"] = time.time()
        time.sleep(0.01)
    wait_settled(conn, name, count)
    lat = sorted((t - committed[p.split("=", 1)[1]]) * 1000 for t, p in arrivals(base) if p.startswith(f"/{name}?t="))
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def status(conn):
    """in flight, slow endpoints, their requests in flight, concurrency (a 0.2.0 worker
    shows only the first: the same script measures the version before)."""
    try:
        return conn.execute("SELECT in_flight, slow_endpoints, in_flight_slow, concurrency "
                            "FROM postback.worker_status() WHERE role = 'delivery'").fetchone()
    except psycopg.errors.UndefinedColumn:
        in_flight = conn.execute("SELECT in_flight FROM postback.worker_status() WHERE role = 'delivery'").fetchone()[0]
        return (in_flight, None, None, conn.execute("SHOW postback.concurrency").fetchone()[0])


def quiet(conn, timeout=60):
    """Waits until the worker has no request open (the hanging ones time out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and status(conn)[0] > 0:
        time.sleep(0.2)


def slow_partners(conn, tag, n, base, hanging, backlog):
    """n slow partners (half answer after 5 s, half never), each with `backlog` deliveries."""
    conn.execute(
        "INSERT INTO postback.endpoints (name, url_template, events) "
        "SELECT %s || g, CASE WHEN g %% 2 = 0 THEN %s ELSE %s END || g || '?t={transaction_id}', %s "
        "FROM generate_series(1, %s) g",
        (f"{tag}-", f"{base}/slow5/", hanging.url("/h/"), [tag], n))
    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                 "SELECT 'c', %s || g, %s FROM generate_series(1, %s) g", (tag + "-", tag, backlog))


def stop_partners(conn, tag):
    """Pauses them and ends what they still have queued (each run starts from an
    empty queue, as the scenarios are independent)."""
    conn.execute("UPDATE postback.endpoints SET active = false, paused_at = now() WHERE name LIKE %s", (tag + "-%",))
    conn.execute("UPDATE postback.deliveries SET state = 'dead', completed_at = now(), "
                 "last_error = 'bench: scenario over' WHERE state = 'pending' "
                 "AND endpoint_id = ANY (ARRAY(SELECT id FROM postback.endpoints WHERE name LIKE %s))", (tag + "-%",))


def rss_of(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "Threads"):
                out[key] = int(value.split()[0])
    return out


def open_requests(results):
    """1,000 endpoints x 1 request to a partner that never answers, in a cluster of
    its own (a fresh worker): its private memory and threads while all are open."""
    step("1,000 endpoints x 1 request to a partner that never answers (own cluster)")
    c = Cluster.create(settings={"max_connections": "50"})
    try:
        c.start()
        with c.connect() as conn:
            conn.autocommit = True
            conn.execute("CREATE EXTENSION pg_postback")
            c.wait_for(lambda: status(conn)[3], what="the worker's first pass")
            opener = Hanging().start()
            pid = conn.execute("SELECT pid FROM postback.worker_status() WHERE role = 'delivery'").fetchone()[0]
            before = rss_of(pid)
            conn.execute(
                "INSERT INTO postback.endpoints (name, url_template, events, max_in_flight, timeout) "
                "SELECT 'open-' || g, %s || g || '?t={transaction_id}', '{open}', 1, '60 seconds' "
                "FROM generate_series(1, 1000) g", (opener.url("/open/"),))
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                         "SELECT 'c', 'open-' || g, 'open' FROM generate_series(1, 1000) g")
            deadline = time.monotonic() + 20
            peak = {"RssAnon": 0, "Threads": 0}
            opened = 0
            while time.monotonic() < deadline:
                opened = max(opened, status(conn)[0])
                now = rss_of(pid)
                peak = {k: max(peak[k], now[k]) for k in peak}
                if opened >= 1000:
                    break
                time.sleep(0.2)
            for _ in range(10):  # a while with all of them open
                now = rss_of(pid)
                peak = {k: max(peak[k], now[k]) for k in peak}
                time.sleep(0.2)
            results["open_requests"] = opened
            results["open_requests_rss_mib"] = peak["RssAnon"] / 1024
            results["rss_before_open_mib"] = before["RssAnon"] / 1024
            results["worker_threads_at_open_requests"] = peak["Threads"]
            print(f"    {opened} open; RssAnon {before['RssAnon'] / 1024:.1f} -> {peak['RssAnon'] / 1024:.1f} MiB; "
                  f"threads {peak['Threads']}", flush=True)
            opener.stop()
    finally:
        c.destroy()


def main():
    results = {}
    port = free_port()
    receiver = subprocess.Popen([os.path.join(TARGET, "bench_receiver"), str(port)])
    hanging = Hanging().start()
    base = f"http://127.0.0.1:{port}"
    c = Cluster.create(settings={"synchronous_commit": "on", "max_connections": "50"})
    try:
        c.start()
        time.sleep(0.3)
        with c.connect() as conn:
            conn.autocommit = True
            conn.execute("CREATE EXTENSION pg_postback")
            c.wait_for(lambda: status(conn)[3], what="the worker's first pass")
            concurrency = status(conn)[3]
            step(f"worker defaults: concurrency {concurrency}")
            alone = drain(conn, "alone", f"{base}/alone?t={{transaction_id}}")
            urllib.request.urlopen(f"{base}/__reset").read()
            p99_alone = latency_p99(conn, base, "lat", 200)
            results["fast_drain_alone_s"] = alone
            results["latency_p99_alone_ms"] = p99_alone
            worst, worst_p99 = 0.0, 0.0
            breakers = [("on", None)] if QUICK else [("on", None), ("off", "0")]
            for breaker, failures in breakers:
                if failures is not None:
                    conn.execute(f"ALTER SYSTEM SET postback.breaker_failures = {failures}")
                    conn.execute("SELECT pg_reload_conf()")
                    time.sleep(1)
                for n in (10, 50, 200):
                    tag = f"s{n}{breaker}"
                    # alone again, just before: the same history as the run beside them
                    alone = drain(conn, f"a{tag}", f"{base}/a{tag}?t={{transaction_id}}")
                    step(f"{n} slow partners (half 5 s, half hanging), breaker {breaker}, beside a fast one")
                    slow_partners(conn, tag, n, base, hanging, 40)
                    time.sleep(1.5)  # the slow ones are out for over a second: counted slow
                    st = status(conn)
                    beside = drain(conn, f"f{tag}", f"{base}/f{tag}?t={{transaction_id}}")
                    urllib.request.urlopen(f"{base}/__reset").read()
                    p99 = latency_p99(conn, base, f"l{tag}", 200)
                    ratio = beside / alone
                    results[f"noisy_{n}_breaker_{breaker}_ratio"] = ratio
                    results[f"noisy_{n}_breaker_{breaker}_p99_added_ms"] = p99 - p99_alone
                    print(f"    in flight {st[0]} (slow endpoints {st[1]} holding {st[2]}); "
                          f"drain {beside:.2f} s vs {alone:.2f} s alone = {ratio:.2f}x; p99 {p99:.1f} ms", flush=True)
                    worst, worst_p99 = max(worst, ratio), max(worst_p99, p99 - p99_alone)
                    stop_partners(conn, tag)
                    quiet(conn)
            results["noisy_many_ratio"] = worst
            results["noisy_many_p99_added_ms"] = worst_p99

    finally:
        c.destroy()
        receiver.terminate()
        hanging.stop()
    open_requests(results)
    figures.write("slow.json", results)


if __name__ == "__main__":
    main()
