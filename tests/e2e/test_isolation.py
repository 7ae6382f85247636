"""A slow, hanging or failing partner never delays the others; per-endpoint limits and the breaker."""

import json
import os
import signal
import time


from helpers import convert_for, scoped_endpoint


def endpoint(conn, url, **options):
    return scoped_endpoint(conn, url, "iso", **options)


def convert(conn, event, n=1):
    return convert_for(conn, event, n)


def count(conn, name, states):
    return conn.execute(
        "SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
        "WHERE e.name = %s AND d.state = ANY (%s)", (name, list(states))).fetchone()[0]


def test_a_hanging_partner_does_not_hold_the_others(cluster, receiver, hanging):
    with cluster.connect() as conn:
        slow = endpoint(conn, hanging.url("/pb?c={click_id}"), timeout="20 seconds", max_in_flight=4)
        fast = endpoint(conn, receiver.url("/fast?c={click_id}"))
        convert(conn, slow, 200)
        convert(conn, fast, 300)
        cluster.wait_for(lambda: count(conn, fast, ["succeeded"]) == 300, timeout=15,
                         what="the fast partner's deliveries beside the hanging one")
        # the hanging partner's requests are still waiting: none finished, at most 4 out at once
        assert count(conn, slow, ["succeeded", "dead"]) == 0
        assert len(hanging.conns) <= 4
        # a single conversion committed now reaches the fast partner at once
        started = time.monotonic()
        convert(conn, fast, 1)
        cluster.wait_for(lambda: len(receiver.seen("/fast")) == 301, timeout=5, what="a new conversion")
        assert time.monotonic() - started < 5
        conn.execute("UPDATE postback.endpoints SET active = false WHERE name = %s", (slow,))


def test_max_in_flight_is_respected(cluster, receiver):
    receiver.script("/slowish", {"delay": 0.2})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/slowish?c={click_id}"), max_in_flight=3)
        convert(conn, name, 24)
        cluster.wait_for(lambda: count(conn, name, ["succeeded"]) == 24, what="24 deliveries")
    assert receiver.max_active["/slowish"] == 3


def test_rate_limit_paces_requests(cluster, receiver):
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/paced?c={click_id}"), rate_limit=5)
        convert(conn, name, 16)
        cluster.wait_for(lambda: count(conn, name, ["succeeded"]) == 16, what="16 paced deliveries")
        retried = conn.execute(
            "SELECT count(*) FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id "
            "JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = %s AND a.outcome <> 'succeeded'",
            (name,)).fetchone()[0]
    times = sorted(r["time"] for r in receiver.seen("/paced"))
    assert retried == 0
    # spaced 1/5 s apart: 16 requests take at least ~3 s
    assert times[-1] - times[0] >= 2.7, times[-1] - times[0]
    for t in times:
        window = [x for x in times if t <= x < t + 1.0]
        assert len(window) <= 6, window


def alerts(conn):
    out = []
    for n in conn.notifies(timeout=0.2, stop_after=100):
        out.append(json.loads(n.payload))
    return out


def test_breaker_opens_probes_closes_and_announces_each_change(make_cluster, receiver):
    c = make_cluster({"postback.breaker_failures": "3", "postback.breaker_cooldown": "'1s'"})
    receiver.script("/down", *([{"status": 503}] * 4), {"status": 200})
    with c.connect() as conn, c.connect() as listener:
        conn.execute("CREATE EXTENSION pg_postback")
        listener.execute("LISTEN postback_alerts")
        name = endpoint(conn, receiver.url("/down?c={click_id}"), retry_schedule=["100 ms"], max_attempts=20,
                        max_in_flight=1)
        convert(conn, name, 5)
        c.wait_for(lambda: conn.execute("SELECT breaker FROM postback.endpoint_health WHERE endpoint = %s",
                                        (name,)).fetchone()[0] == "open", what="the breaker to open")
        # while open nothing is sent and no attempt is spent
        attempts_when_open = len(receiver.seen("/down"))
        assert attempts_when_open == 3
        time.sleep(0.5)
        assert len(receiver.seen("/down")) == 3
        c.wait_for(lambda: count(conn, name, ["succeeded"]) == 5, timeout=30, what="recovery")
        events = []
        try:
            c.wait_for(lambda: events.extend(alerts(listener)) or [e["state"] for e in events][-1:] == ["closed"],
                       timeout=10, what="the closing alert")
        except AssertionError:
            raise AssertionError(f"alerts: {[e['state'] for e in events]}; "
                                 f"seen {len(receiver.seen('/down'))}")
    states = [e["state"] for e in events]
    # open, one failed probe re-opens it, a successful probe closes it
    assert states == ["open", "half_open", "open", "half_open", "closed"], states
    with c.connect() as conn:
        eid, pid = conn.execute("SELECT e.id, (SELECT pid FROM postback.worker_status() WHERE role = 'delivery') "
                                "FROM postback.endpoints e WHERE e.name = %s", (name,)).fetchone()
        total = conn.execute("SELECT count(*) FROM postback.attempts").fetchone()[0]
        # the reason is in endpoint_state, for the roles that may read it
        reason = conn.execute("SELECT breaker_reason FROM postback.endpoint_state WHERE endpoint_id = %s",
                              (eid,)).fetchone()[0]
        assert reason, reason
    # the broadcast holds ids and states only (any connected role may LISTEN),
    # and the worker's pid, which tells its alerts from forged ones
    assert all(set(e) == {"endpoint_id", "state", "previous", "since", "worker_pid"} for e in events), events[0]
    assert all(e["endpoint_id"] == eid and e["worker_pid"] == pid for e in events)
    # 3 failures + failed probe + successful probe + the 4 others: nothing spent while open
    assert total == len(receiver.seen("/down")) == 3 + 1 + 1 + 4, total


def test_an_endpoint_failing_too_long_is_deactivated(make_cluster):
    c = make_cluster({"postback.disable_after": "'2s'", "postback.breaker_failures": "0"})
    with c.connect() as conn, c.connect() as listener:
        conn.execute("CREATE EXTENSION pg_postback")
        listener.execute("LISTEN postback_alerts")
        name = endpoint(conn, "http://127.0.0.1:9/gone?c={click_id}", retry_schedule=["200 ms"], max_attempts=100)
        # another endpoint failing for long with a 10 kB last error: more than a
        # NOTIFY may carry, which once stopped every endpoint from being disabled
        other = endpoint(conn, "http://127.0.0.1:9/other?c={click_id}")
        conn.execute("INSERT INTO postback.endpoint_state (endpoint_id, failing_since, last_error) "
                     "SELECT id, now() - interval '1 hour', repeat('e', 10000) FROM postback.endpoints WHERE name = %s",
                     (other,))
        convert(conn, name, 1)
        active = "SELECT active FROM postback.endpoints WHERE name = %s"
        c.wait_for(lambda: not conn.execute(active, (name,)).fetchone()[0] and not conn.execute(active, (other,)).fetchone()[0],
                   timeout=20, what="both endpoints to be deactivated")
        ids = {r[0] for r in conn.execute("SELECT id FROM postback.endpoints WHERE name IN (%s, %s)", (name, other))}
        events = []
        c.wait_for(lambda: events.extend(alerts(listener)) or
                   {e["endpoint_id"] for e in events if e["state"] == "disabled"} == ids,
                   what="a disabled alert for each")
        assert conn.execute("SELECT count(*) FROM postback.deliveries WHERE state = 'pending'").fetchone()[0] == 1


def test_retry_after_as_an_http_date_is_honoured(cluster, receiver):
    from email.utils import formatdate
    receiver.script("/later", {"status": 503, "headers": {"Retry-After": formatdate(time.time() + 3, usegmt=True)}},
                    {"status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/later?c={click_id}"), retry_schedule=["100 ms"])
        convert(conn, name, 1)
        cluster.wait_for(lambda: count(conn, name, ["succeeded"]) == 1, timeout=15, what="the retry")
    first, second = receiver.seen("/later")
    assert second["time"] - first["time"] >= 1.9, second["time"] - first["time"]


def test_sigkill_in_a_mixed_fast_and_hanging_run_loses_nothing(make_cluster, receiver, hanging):
    c = make_cluster({"postback.breaker_failures": "0"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        slow = endpoint(conn, hanging.url("/h?c={click_id}"), timeout="1 second", max_attempts=1)
        fast = endpoint(conn, receiver.url("/f?c={click_id}"))
        convert(conn, slow, 20)
        convert(conn, fast, 2000)
        c.wait_for(lambda: count(conn, fast, ["succeeded"]) > 100, what="some progress")
        pid = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_postback worker'").fetchone()[0]
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    with c.connect() as conn:
        c.wait_for(lambda: count(conn, fast, ["succeeded"]) == 2000 and count(conn, slow, ["dead"]) == 20,
                   timeout=60, what="everything settled after the crash")
        lost = conn.execute("SELECT count(*) FROM postback.deliveries WHERE state NOT IN ('succeeded', 'dead')"
                            ).fetchone()[0]
        assert lost == 0
        recorded = conn.execute(
            "SELECT count(*) FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id "
            "JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = %s AND a.error IS DISTINCT FROM "
            "'interrupted: the worker stopped while this attempt was in flight; the receiver may or may not have "
            "received it'", (fast,)).fetchone()[0]
    # every request the receiver saw is on record, but for those the crash interrupted (re-sent: at least once)
    assert len(receiver.seen("/f")) >= 2000 and recorded >= 2000
