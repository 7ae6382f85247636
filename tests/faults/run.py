"""Nothing is lost: crashes, broken receivers and hostile input, against a real preloaded cluster.

usage: python3 tests/faults/run.py [--quick]

For each scenario: deliveries expected, succeeded, dead (each with a reason), lost
(neither succeeded nor dead nor pending with a future retry once it settles), attempts
recorded vs requests the receiver saw (a difference is a re-send after a crash:
at-least-once), and duplicates (one idempotency key received twice). Then every
bad-input case must be refused at once with a clear error and nothing half-written.
Prints a table, writes target/faults/summary.json, exits non-zero if anything is
lost or any bad input is accepted. --quick runs a few scenarios and all bad input
(part of `make test`).
"""

import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from cluster import Cluster  # noqa: E402
from receiver import Hanging, Receiver, SlowLoris  # noqa: E402

QUICK = "--quick" in sys.argv
import psycopg  # noqa: E402


class Scenario:
    def __init__(self, cluster, name):
        self.cluster, self.name = cluster, name
        self.event = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
        self.receiver = Receiver().start()
        self.extra = []

    def endpoint(self, url=None, path="/r", **options):
        url = url or self.receiver.url(path + "?k={transaction_id}")
        cols = ["name", "url_template", "events"] + list(options)
        vals = [self.name, url, [self.event]] + list(options.values())
        with self.cluster.connect() as conn:
            conn.execute(f"INSERT INTO postback.endpoints ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(vals))})",
                         vals)

    def convert(self, n, start=1, conn=None):
        own = conn is None
        conn = conn or self.cluster.connect()
        try:
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                         "SELECT 'c', %s || '-' || g, %s FROM generate_series(%s::int, %s::int) g",
                         (self.event, self.event, start, start + n - 1))
        finally:
            if own:
                conn.close()

    def counts(self):
        with self.cluster.connect() as conn:
            return conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE d.state = 'succeeded'),"
                "       count(*) FILTER (WHERE d.state = 'dead' AND d.last_error IS NOT NULL),"
                "       count(*) FILTER (WHERE d.state = 'dead' AND d.last_error IS NULL),"
                "       count(*) FILTER (WHERE d.state = 'pending' AND d.next_attempt_at > now()),"
                "       (SELECT count(*) FROM postback.attempts a JOIN postback.deliveries x ON x.id = a.delivery_id "
                "         WHERE x.endpoint_id = e.id AND a.error IS DISTINCT FROM "
                "         'interrupted: the worker stopped while this attempt was in flight; "
                "the receiver may or may not have received it')"
                "  FROM postback.endpoints e LEFT JOIN postback.deliveries d ON d.endpoint_id = e.id "
                " WHERE e.name = %s GROUP BY e.id", (self.name,)).fetchone()

    def settle(self, expected, timeout=60):
        """Waits until every delivery succeeded or died (or the timeout passes:
        what is then pending with a future retry is not lost, and is reported)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                total, ok, dead, _, _, _ = self.counts()
                if total == expected and ok + dead == expected:
                    return
            except psycopg.OperationalError:
                pass  # the cluster is restarting
            time.sleep(0.2)

    def report(self, expected):
        total, ok, dead, dead_without_reason, later, attempts = self.counts()
        seen = self.receiver.seen()
        # a duplicate: a delivery the receiver accepted (2xx) more than once
        keys = Counter(r["query"].get("k") or r["headers"].get("idempotency-key")
                       for r in seen if 200 <= r.get("status", 200) < 300)
        self.receiver.stop()
        for e in self.extra:
            e.stop()
        return {"scenario": self.name, "expected": expected, "succeeded": ok, "dead": dead,
                "lost": expected - ok - dead - later + dead_without_reason, "attempts_recorded": attempts,
                "requests_seen": len(seen), "duplicates": sum(n - 1 for n in keys.values() if n > 1)}


def worker_pid(cluster):
    with cluster.connect() as conn:
        return cluster.wait_for(lambda: (conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_postback worker'").fetchone() or [None])[0],
            what="the worker")


def run_scenario(cluster, name, body):
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
    s = Scenario(cluster, name)
    expected = body(s)
    s.settle(expected)
    return s.report(expected)


def recovers_after_500s(s):
    s.receiver.script("/r", *([{"status": 500}] * 30), {"status": 200})
    s.endpoint(retry_schedule=["200 ms"], max_attempts=50)
    s.convert(50)
    return 50


def never_answers(s):
    h = Hanging().start()
    s.extra.append(h)
    s.endpoint(url=h.url("/h?k={transaction_id}"), timeout="1 second", max_attempts=2, retry_schedule=["100 ms"])
    s.convert(20)
    return 20


def slow_loris(s):
    # headers trickled one byte a second: cut off by the endpoint's timeout like a
    # partner that never answers, and dead with that reason after its attempts
    loris = SlowLoris().start()
    s.extra.append(loris)
    s.endpoint(url=loris.url("/l?k={transaction_id}"), timeout="2 seconds", max_attempts=2,
               retry_schedule=["100 ms"])
    s.convert(10)
    return 10


def resets_mid_response(s):
    s.receiver.script("/r", {"reset": True}, {"reset": True}, {"status": 200})
    s.endpoint(retry_schedule=["100 ms"], max_attempts=10)
    s.convert(20)
    return 20


def closes_keep_alive(s):
    s.receiver.script("/r", {"close": True})
    s.endpoint()
    s.convert(300)
    return 300


def huge_and_endless_bodies(s):
    s.receiver.script("/big", {"body": "x" * (10 * 1024 * 1024)})
    s.receiver.script("/endless", {"endless": True})
    s.endpoint(url=s.receiver.url("/big?k={transaction_id}"))
    s.convert(5)
    with s.cluster.connect() as conn:
        conn.execute("UPDATE postback.endpoints SET url_template = %s WHERE name = %s",
                     (s.receiver.url("/endless?k={transaction_id}"), s.name))
    s.convert(5, start=6)
    return 10


def redirects_elsewhere(s):
    other = Receiver().start()
    s.extra.append(other)
    s.receiver.script("/r", {"status": 302, "headers": {"Location": other.url("/stolen")}})
    s.endpoint()
    s.convert(10)
    s.other = other
    return 10


def connection_refused(s):
    s.endpoint(url="http://127.0.0.1:9/r?k={transaction_id}", retry_schedule=["100 ms"], max_attempts=3)
    s.convert(10)
    return 10


def outside_allowed_targets(s):
    s.endpoint(url=f"http://127.0.0.2:{s.receiver.port}/r?k={{transaction_id}}")
    s.convert(10)
    return 10


def sigkill_mid_run(s):
    s.endpoint()
    s.convert(5000 if not QUICK else 2000)
    time.sleep(0.3)
    os.kill(worker_pid(s.cluster), signal.SIGKILL)
    return 5000 if not QUICK else 2000


def immediate_stop_mid_run(s):
    s.endpoint()
    s.convert(3000)
    time.sleep(0.3)
    s.cluster.stop("immediate")
    s.cluster.start()
    return 3000


def flapping_endpoint(s):
    n = 10_000 if not QUICK else 2_000
    s.endpoint(retry_schedule=["200 ms", "500 ms"], max_attempts=100)
    stop = threading.Event()

    def flap():
        up = True
        while not stop.is_set():
            s.receiver.script("/r", {"status": 200} if up else {"status": 503})
            up = not up
            stop.wait(1.0)
        s.receiver.script("/r", {"status": 200})

    t = threading.Thread(target=flap, daemon=True)
    t.start()
    s.convert(n)
    s.settle(n, timeout=120)
    stop.set()
    t.join()
    return n


def concurrent_inserters(s):
    s.endpoint()
    threads = [threading.Thread(target=lambda i=i: [s.convert(50, start=i * 10_000 + j * 50 + 1)
                                                      for j in range(10)]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 8 * 500


SCENARIOS = [
    ("500 for a while, then recovers", recovers_after_500s, True),
    ("accepts and never answers", never_answers, False),
    ("slow loris: headers a byte a second", slow_loris, True),
    ("resets mid-response", resets_mid_response, True),
    ("closes keep-alive connections", closes_keep_alive, False),
    ("10 MiB body and an endless body", huge_and_endless_bodies, False),
    ("301/302 to another loopback port", redirects_elsewhere, False),
    ("connection refused", connection_refused, True),
    ("target outside allowed_targets", outside_allowed_targets, True),
    ("SIGKILL of the worker mid-run", sigkill_mid_run, True),
    ("pg_ctl stop -m immediate mid-run", immediate_stop_mid_run, False),
    ("endpoint flapping every second", flapping_endpoint, False),
    ("8 connections inserting at once", concurrent_inserters, False),
]

# ---------------------------------------------------------------------------
# Bad input: refused at once, with SQLSTATE and a message naming the field
# ---------------------------------------------------------------------------
E = "INSERT INTO postback.endpoints (name, url_template{cols}) VALUES ('bad-ep', {tpl}{vals})"
C = "INSERT INTO postback.conversions (click_id, transaction_id{cols}) VALUES ({click}, 'bad-tx'{vals})"


def ep(tpl="'https://n.test/pb?c={click_id}'", **kw):
    return E.format(tpl=tpl, cols="".join(", " + k for k in kw), vals="".join(", " + v for v in kw.values()))


def cv(click="'c'", **kw):
    return C.format(click=click, cols="".join(", " + k for k in kw), vals="".join(", " + v for v in kw.values()))


BAD = [
    (ep("'https://n.test/pb?c={click_id'"), "unclosed"),
    (ep("'https://n.test/pb?c=click_id}'"), "unmatched"),
    (ep("'https://n.test/pb?c={clickid}'"), "unknown variable"),
    (ep("'ftp://n.test/{click_id}'"), "scheme"),
    (ep("'javascript:alert(1)'"), "scheme"),
    (ep("E'https://n.test/a\\nb'"), "control character"),
    (ep("'https://n.test/?a=' || repeat('x', 102400)"), "limit is 8192"),
    (ep("'https://{click_id}.n.test/'"), "scheme or host"),
    (ep("'http:///{click_id}:80/pb'"), "empty host"),
    (ep("'https:{click_id}/pb'"), "must start with http"),
    (ep("E'http:\\\\\\\\{click_id}\\\\pb'"), "backslash"),
    (ep("'https://n.test:{click_id}/'"), "scheme or host"),
    (ep("'https://user:pw@n.test/'"), "credentials"),
    (ep("'https://n.test/?a={amount|mul:x}'"), "not a decimal"),
    (ep("'https://n.test/?a={amount|div:0}'"), "division by zero"),
    (ep("'https://n.test/?a={occurred_at|tz:Nowhere/City}'"), "IANA"),
    (ep("'https://n.test/?a={click_id|nope}'"), "unknown filter"),
    (ep("'https://n.test/?a={{order.number}}'"), "unknown variable"),
    (ep(kind="'email'"), 'invalid kind: "email" is not one of postback, webhook'),
    (ep(method="'DELETE'"), 'invalid method: "DELETE" is not one of GET, POST, PUT, PATCH'),
    (ep(method="E'GET / HTTP/1.1\\r\\nX: y'"), "invalid method: "),
    (ep(headers="'{\"Host\": \"evil.test\"}'"), "Host"),
    (ep(headers="'{\"X-Key\": \"a\\r\\nX-Injected: 1\"}'"), "control character"),
    (ep(headers="'{\"Content-Length\": \"1\"}'"), "Content-Length"),
    (ep(headers="'{\"Transfer-Encoding\": \"chunked\"}'"), "Transfer-Encoding"),
    (ep(headers="'[\"x\"]'"), "JSON object"),
    (ep(kind="'webhook'", signing_scheme="'rot13'"), 'invalid signing_scheme: "rot13" is not one of none, hmac'),
    (ep(signing_scheme="'stripe'"), "invalid signing_scheme: a postback (GET) is signed with hmac-sha256-hex"),
    (ep(statuses="'{paid}'"), 'invalid statuses: "paid" is not one of pending, approved'),
    (cv(amount="'Infinity'"), "amount_must_be_a_finite_number"),
    (ep(retry_schedule="'{-1 minute}'"), "invalid retry_schedule: step 1 is -60 s"),
    (ep(max_attempts="0"), "invalid max_attempts: 0 is outside 1 to 100"),
    (ep(timeout="'10 minutes'"), "invalid timeout: 600 is outside 1 millisecond to 5 minutes"),
    (ep(partners="'{}'"), "partners"),
    (ep(partners="ARRAY[repeat('p', 101)]"), "partners"),
    (ep(conditions="'[1]'"), "conditions"),
    (ep(success_statuses="'{2xx}'"), "success_statuses"),
    (ep(retry_statuses="'{700}'"), "retry_statuses"),
    (ep(initial_delay="'2 days'"), "initial_delay"),
    (ep(success_body_pattern="'(unclosed'"), "regular expression"),
    (ep(max_in_flight="0"), "max_in_flight"),
    (ep(rate_limit="-1"), "rate_limit"),
    (ep(status_map="'[1]'"), "status_map"),
    ("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) VALUES (1, '')", "invalid secret: signing secret must not be empty"),
    ("SELECT postback.sign('x', 'whsec_not base64!', 'standard-webhooks')", "base64"),
    (cv(status="'paid'"), "column status"),
    (cv(currency="'eur'"), "column currency"),
    (cv(currency="'EURO'"), "column currency"),
    (cv(event="'Big Sale'"), "column event"),
    (cv(click="NULL"), "click_id"),
    (cv(click="repeat('x', 600)"), "click_id must be 1 to 512"),
    ("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', repeat('t', 300))", "transaction_id"),
    ("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', NULL)", "transaction_id"),
    (cv(partner="''"), "column partner"),
    (cv(partner="E'a\\nb'"), "column partner"),
    (cv(amount="'NaN'"), "amount_must_be_a_finite_number"),
    (cv(attributes="'[1, 2]'"), "attributes_must_be_a_json_object"),
    ("INSERT INTO postback.clicks (click_id, partner) VALUES ('k', '')", "click_partner"),
    ("INSERT INTO postback.clicks (click_id, attributes) VALUES ('k', '\"x\"')", "click_attributes"),
    ("SELECT postback.retry(-1)", "unknown delivery"),
    ("SELECT postback.replay('no-such-endpoint', now() - interval '1 day')", "unknown endpoint"),
    ("SELECT postback.pause('no-such-endpoint')", "unknown endpoint"),
    ("SELECT postback.send_test('bad-input-ok', '[1]')", "sample must be a JSON object"),
    ("SELECT postback.purge('1 day', 0)", "batch must be"),
    ("SET postback.allowed_targets = '10.0.0.0/33'", "allowed_targets"),
]

# hostile values: accepted, but rendered encoded; never a header, a request line or a parameter
HOSTILE = ["a&b=c", "x#frag", "%00", "a\r\nX-Injected: 1", "'; DROP TABLE postback.conversions; --",
           "\"quoted\"", "a b+c", "../../etc/passwd", "x" * (1024 * 1024)]


def bad_input(cluster):
    rejected, failures = 0, []
    with cluster.connect() as conn:
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('bad-input-ok', 'https://n.test/')")
        before = conn.execute("SELECT (SELECT count(*) FROM postback.endpoints), "
                              "(SELECT count(*) FROM postback.conversions), "
                              "(SELECT count(*) FROM postback.deliveries)").fetchone()
        for sql, expected in BAD:
            try:
                conn.execute(sql)
                failures.append(f"accepted: {sql[:120]}")
            except psycopg.Error as e:
                message = f"{e.diag.message_primary} {e.diag.message_detail or ''} {e.diag.message_hint or ''}"
                if e.sqlstate and expected.lower() in message.lower():
                    rejected += 1
                else:
                    failures.append(f"unclear error for {sql[:80]}: [{e.sqlstate}] {message[:200]}")
        after = conn.execute("SELECT (SELECT count(*) FROM postback.endpoints), "
                             "(SELECT count(*) FROM postback.conversions), "
                             "(SELECT count(*) FROM postback.deliveries)").fetchone()
        if before != after:
            failures.append(f"something was half-written: {before} -> {after}")
    return rejected, failures


def hostile_values(cluster):
    receiver = Receiver().start()
    failures = []
    try:
        with cluster.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template, events, kind) VALUES "
                         "('hostile-pb', %s, '{hostile}', 'postback'), ('hostile-wh', %s, '{hostile}', 'webhook')",
                         (receiver.url("/pb?c={click_id}&s={attributes.v}&x=1"), receiver.url("/wh")))
            for i, v in enumerate(HOSTILE):
                conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, attributes) "
                             "VALUES (%s, %s, 'hostile', jsonb_build_object('v', %s::text))",
                             (v[:512], f"hostile-{i}", v))
            cluster.wait_for(lambda: conn.execute(
                "SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
                "WHERE e.name LIKE 'hostile-%' AND d.state IN ('succeeded', 'dead')").fetchone()[0] == 2 * len(HOSTILE),
                timeout=60, what="the hostile deliveries")
        for r in receiver.seen("/pb"):
            if set(r["query"]) != {"c", "s", "x"} or r["query"]["x"] != "1":
                failures.append(f"a value injected a query parameter: {r['raw_query'][:100]}")
            if "x-injected" in r["headers"]:
                failures.append("a value injected a header")
        values = {r["query"]["s"] for r in receiver.seen("/pb")}
        missing = [v for v in HOSTILE if len(v) < 8000 and v not in values]
        if missing:
            failures.append(f"values not received intact: {missing}")
    finally:
        receiver.stop()
    return failures


def main():
    c = Cluster.create(settings={"postback.allowed_targets": "'127.0.0.1/32'", "postback.breaker_failures": "0",
                                 "postback.max_response_bytes": "'4kB'"})
    scenarios, failures = [], []
    try:
        c.start()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
        for title, body, in_quick in SCENARIOS:
            if QUICK and not in_quick:
                continue
            result = run_scenario(c, title, body)
            scenarios.append(result)
        print(f"[{time.strftime('%H:%M:%S')}] bad input ({len(BAD)} cases) and hostile values", flush=True)
        rejected, bad_failures = bad_input(c)
        failures += bad_failures
        failures += hostile_values(c)
    finally:
        c.destroy()

    header = f"{'scenario':<36} {'expected':>8} {'succeeded':>9} {'dead':>6} {'lost':>5} {'attempts':>8} {'seen':>6} {'dups':>5}"
    print("\n" + header)
    for s in scenarios:
        print(f"{s['scenario']:<36} {s['expected']:>8} {s['succeeded']:>9} {s['dead']:>6} {s['lost']:>5} "
              f"{s['attempts_recorded']:>8} {s['requests_seen']:>6} {s['duplicates']:>5}")
    print(f"\nbad input: {rejected} of {len(BAD)} refused with a clear error")
    out = os.path.join(ROOT, "target", "faults")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"scenarios": scenarios, "bad_input_cases": len(BAD), "bad_input_rejected": rejected,
                   "failures": failures}, f, indent=2)
    lost = sum(s["lost"] for s in scenarios)
    for f in failures:
        print(f"FAIL: {f}")
    if lost or rejected < len(BAD) or failures:
        print(f"\nFAILED: {lost} lost, {len(BAD) - rejected} bad inputs not refused clearly, {len(failures)} failures")
        sys.exit(1)
    print("\nnothing lost; every bad input refused")


if __name__ == "__main__":
    main()
