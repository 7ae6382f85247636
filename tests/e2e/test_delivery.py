"""The worker delivers over real HTTP to a loopback receiver and records every attempt."""

import itertools
import os
import signal
import time

from standardwebhooks.webhooks import Webhook

from receiver import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
counter = itertools.count()




def endpoint(conn, url, **options):
    name = f"ep{next(counter)}"
    cols = ["name", "url_template"] + list(options)
    vals = [name, url] + list(options.values())
    conn.execute(
        f"INSERT INTO postback.endpoints ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(vals))})", vals)
    return name


def convert(conn, n=1, **fields):
    tag = next(counter)
    conn.execute(
        "INSERT INTO postback.conversions (click_id, transaction_id, event, amount, currency, attributes) "
        "SELECT 'clk-' || g, %s || '-' || g, %s, g * 1.5, 'EUR', jsonb_build_object('sub1', 'a&b ' || g) "
        "FROM generate_series(1, %s) g",
        (f"tx{tag}", fields.get("event", "sale"), n))
    return f"tx{tag}"


def deliveries(conn, name):
    return conn.execute(
        "SELECT d.id, d.state, d.attempts, d.last_error FROM postback.deliveries d "
        "JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = %s ORDER BY d.id", (name,)).fetchall()


def attempts(conn, name):
    return conn.execute(
        "SELECT a.attempt_no, a.started_at, a.status_code, a.error, a.outcome, a.duration_ms "
        "FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id "
        "JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = %s "
        "ORDER BY a.delivery_id, a.attempt_no", (name,)).fetchall()


def wait_finished(cluster, conn, name, count, timeout=30):
    def done():
        rows = deliveries(conn, name)
        return rows if len(rows) == count and all(r[1] in ("succeeded", "dead") for r in rows) else None
    return cluster.wait_for(done, timeout=timeout, what=f"{count} finished deliveries of {name}")


def test_postbacks_and_signed_webhooks_arrive_exactly(cluster, receiver):
    with cluster.connect() as conn:
        pb = endpoint(conn, receiver.url("/pb/{event}") + "?cid={click_id}&tx={transaction_id}"
                      "&amount={amount}&cur={currency}&s1={attributes.sub1}", events=["sale"])
        wh = endpoint(conn, receiver.url("/hook"), kind="webhook", signing_scheme="standard-webhooks",
                      events=["sale"])
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) "
                     "SELECT id, %s FROM postback.endpoints WHERE name = %s", (SECRET, wh))
        tx = convert(conn, 500)
        pb_rows = wait_finished(cluster, conn, pb, 500)
        wh_rows = wait_finished(cluster, conn, wh, 500)
        assert {r[1] for r in pb_rows + wh_rows} == {"succeeded"}
        for name in (pb, wh):
            rows = attempts(conn, name)
            assert len(rows) == 500
            assert {(r[0], r[2], r[4]) for r in rows} == {(1, 200, "succeeded")}

    gets = receiver.seen("/pb/sale")
    assert len(gets) == 500
    by_tx = {r["query"]["tx"]: r for r in gets}
    first = by_tx[f"{tx}-7"]
    assert first["method"] == "GET"
    assert first["query"] == {"cid": "clk-7", "tx": f"{tx}-7", "amount": "10.5", "cur": "EUR", "s1": "a&b 7"}
    assert "s1=a%26b%207" in first["raw_query"]
    assert first["headers"]["user-agent"].startswith("pg_postback/")

    posts = receiver.seen("/hook")
    assert len(posts) == 500
    verifier = Webhook(SECRET)
    for post in posts:
        assert post["method"] == "POST"
        assert post["headers"]["content-type"] == "application/json"
        assert post["headers"]["idempotency-key"] == post["headers"]["webhook-id"]
        payload = verifier.verify(post["body"], {k: post["headers"][k] for k in
                                                 ("webhook-id", "webhook-timestamp", "webhook-signature")})
        assert payload["type"] == "sale" and payload["data"]["currency"] == "EUR"
    assert len({p["headers"]["webhook-id"] for p in posts}) == 500


def test_retries_back_off_until_success(cluster, receiver):
    receiver.script("/flaky", {"status": 500}, {"status": 500}, {"status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/flaky?c={click_id}"), retry_schedule=["200 ms", "400 ms"])
        convert(conn)
        [(_, state, n, _)] = wait_finished(cluster, conn, name, 1)
        rows = attempts(conn, name)
    assert state == "succeeded" and n == 3
    assert [(r[0], r[2], r[4]) for r in rows] == [(1, 500, "retry"), (2, 500, "retry"), (3, 200, "succeeded")]
    gap1 = (rows[1][1] - rows[0][1]).total_seconds()
    gap2 = (rows[2][1] - rows[1][1]).total_seconds()
    assert 0.15 <= gap1 < gap2, (gap1, gap2)


def test_client_errors_are_dead_at_once(cluster, receiver):
    receiver.script("/gone", {"status": 404, "body": "no such click"})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/gone?c={click_id}"), retry_schedule=["100 ms"])
        convert(conn)
        [(_, state, n, error)] = wait_finished(cluster, conn, name, 1)
        [(no, _, code, _, outcome, _)] = attempts(conn, name)
        body = conn.execute("SELECT response_body FROM postback.attempts a JOIN postback.deliveries d "
                            "ON d.id = a.delivery_id JOIN postback.endpoints e ON e.id = d.endpoint_id "
                            "WHERE e.name = %s", (name,)).fetchone()[0]
    assert (state, n, no, code, outcome) == ("dead", 1, 1, 404, "dead")
    assert error == "HTTP 404" and body == "no such click"


def test_body_pattern_failure_is_retried(cluster, receiver):
    receiver.script("/tune", {"body": "success=false;"}, {"body": "success=true;"})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/tune?c={click_id}"), retry_schedule=["100 ms"],
                        success_body_pattern="success=true")
        convert(conn)
        [(_, state, _, _)] = wait_finished(cluster, conn, name, 1)
        rows = attempts(conn, name)
    assert state == "succeeded"
    assert [(r[2], r[4]) for r in rows] == [(200, "retry"), (200, "succeeded")]
    assert "success_body_pattern" in rows[0][3]


def test_a_hang_past_the_timeout_is_a_timeout_not_a_success(cluster, receiver):
    receiver.script("/slow", {"delay": 3, "status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/slow?c={click_id}"), timeout="500 ms", max_attempts=1)
        convert(conn)
        [(_, state, _, error)] = wait_finished(cluster, conn, name, 1)
        [(_, _, code, err, outcome, duration)] = attempts(conn, name)
    assert state == "dead" and outcome == "dead" and code is None
    assert "timed out" in err.lower() or "timeout" in err.lower(), err
    assert duration < 2500


def test_retry_after_is_honoured(cluster, receiver):
    receiver.script("/busy", {"status": 429, "headers": {"Retry-After": "1"}}, {"status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/busy?c={click_id}"), retry_schedule=["100 ms"])
        convert(conn)
        wait_finished(cluster, conn, name, 1)
        rows = attempts(conn, name)
    assert [(r[2], r[4]) for r in rows] == [(429, "retry"), (200, "succeeded")]
    assert (rows[1][1] - rows[0][1]).total_seconds() >= 0.95


def test_redirects_are_not_followed(cluster, receiver):
    receiver.script("/moved", {"status": 302, "headers": {"Location": receiver.url("/elsewhere")}})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/moved?c={click_id}"))
        convert(conn)
        [(_, state, _, error)] = wait_finished(cluster, conn, name, 1)
    assert state == "dead" and "Location: " + receiver.url("/elsewhere") in error
    assert receiver.seen("/elsewhere") == []


def test_targets_outside_the_allowlist_are_refused(cluster, receiver):
    # the cluster allows 127.0.0.1/32 only; 127.0.0.2 is loopback outside it
    with cluster.connect() as conn:
        name = endpoint(conn, f"http://127.0.0.2:{receiver.port}/blocked?c={{click_id}}")
        convert(conn)
        [(_, state, n, error)] = wait_finished(cluster, conn, name, 1)
    assert (state, n) == ("dead", 1)
    assert "refused to connect to 127.0.0.2" in error and "loopback" in error
    assert receiver.seen("/blocked") == []


def test_worker_status_reports_activity(cluster, receiver):
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/status?c={click_id}"))
        convert(conn)
        wait_finished(cluster, conn, name, 1)
        running, pid, sent, last_wake = conn.execute(
            "SELECT running, pid, sent, last_wake FROM postback.worker_status()").fetchone()
    assert running and pid and sent >= 1 and last_wake is not None


def test_a_commit_wakes_the_worker_without_polling(make_cluster, receiver):
    c = make_cluster(settings={"postback.poll_interval": "'60s'"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        name = endpoint(conn, receiver.url("/wake?c={click_id}"))
        # let the worker finish its first pass and go to sleep for 60 s
        time.sleep(1.5)
        convert(conn)
        wait_finished(c, conn, name, 1, timeout=10)
    assert len(receiver.seen("/wake")) == 1


def test_commit_prepared_in_another_session_wakes_the_worker(make_cluster, receiver):
    """Two-phase commit (Citus writing to several nodes, a transaction manager): the
    deliveries become visible at COMMIT PREPARED, often run by another session."""
    c = make_cluster(settings={"postback.poll_interval": "'60s'", "max_prepared_transactions": "10"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        name = endpoint(conn, receiver.url("/prepared?c={click_id}"))
        time.sleep(1.5)
    with c.connect() as writer:
        writer.execute("BEGIN")
        convert(writer)
        writer.execute("PREPARE TRANSACTION 'pg_postback_e2e'")
        # prepared, not committed: nothing to send yet
        time.sleep(1.0)
        assert receiver.seen("/prepared") == []
        with c.connect() as other:
            other.execute("COMMIT PREPARED 'pg_postback_e2e'")
            wait_finished(c, other, name, 1, timeout=10)
    assert len(receiver.seen("/prepared")) == 1


def test_only_a_commit_prepared_whose_transaction_enqueued_wakes_the_worker(make_cluster, receiver):
    """On a Citus node most two-phase commits are other tables' writes: they leave the
    worker asleep (its last wake stays put), while one that enqueued wakes it."""
    c = make_cluster(settings={"postback.poll_interval": "'60s'", "max_prepared_transactions": "10"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        conn.execute("CREATE TABLE public.payments (id int)")
        name = endpoint(conn, receiver.url("/only?c={click_id}"))
        time.sleep(1.5)
        last_wake = "SELECT last_wake FROM postback.worker_status() WHERE role = 'delivery'"
        wakes = set()
        for i in range(6):
            conn.execute("BEGIN")
            conn.execute("INSERT INTO public.payments VALUES (%s)", (i,))
            conn.execute(f"PREPARE TRANSACTION 'other_{i}'")
            conn.execute(f"COMMIT PREPARED 'other_{i}'")
            time.sleep(0.15)
            wakes.add(conn.execute(last_wake).fetchone()[0])
        # asleep throughout, but for one housekeeping round (every 5 s) at most
        assert len(wakes) <= 2, sorted(wakes)
        conn.execute("BEGIN")
        convert(conn)
        conn.execute("PREPARE TRANSACTION 'enqueued'")
        conn.execute("COMMIT PREPARED 'enqueued'")
        wait_finished(c, conn, name, 1, timeout=3)
    assert len(receiver.seen("/only")) == 1


def test_a_commit_for_an_endpoint_busy_with_an_earlier_batch_is_not_left_to_the_poll(make_cluster, receiver):
    """The claim a commit wakes skips endpoints without room for a batch; what that commit
    brought for them is claimed as soon as they have room again, not at the next poll (60 s
    here) or housekeeping round (every 5 s)."""
    c = make_cluster(settings={"postback.poll_interval": "'60s'"})
    receiver.script("/busy", {"delay": 0.05, "status": 200})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        name = endpoint(conn, receiver.url("/busy?tx={transaction_id}"), max_in_flight=1)
        # one answer first: past the slow start, the endpoint may hold 65
        convert(conn)
        wait_finished(c, conn, name, 1, timeout=10)
        first = convert(conn, 40)
        # the worker holds all 40 (more than half of what the endpoint may hold), one on the wire
        c.wait_for(lambda: len(receiver.seen("/busy")) >= 2, what="the first batch on the wire")
        second = convert(conn, 10)
        wait_finished(c, conn, name, 51, timeout=20)
    seen = receiver.seen("/busy")
    last_of_first = max(g["time"] for g in seen if g["query"]["tx"].startswith(first + "-"))
    first_of_second = min(g["time"] for g in seen if g["query"]["tx"].startswith(second + "-"))
    assert first_of_second - last_of_first < 1.0, \
        f"the second batch waited {first_of_second - last_of_first:.1f} s after the first: found by a poll"


def slow_batch_in_flight(c, receiver, path):
    """A fresh database with 40 slow deliveries, some of them on the wire."""
    receiver.script(path, {"delay": 1.0, "status": 200})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        name = endpoint(conn, receiver.url(path + "?c={click_id}&tx={transaction_id}"))
        convert(conn, 40)
        c.wait_for(lambda: receiver.seen(path), what="requests in flight")
        pid = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_postback worker'").fetchone()[0]
    return name, pid


def assert_all_delivered_and_explained(c, receiver, name, path):
    with c.connect() as conn:
        rows = wait_finished(c, conn, name, 40, timeout=60)
        assert {r[1] for r in rows} == {"succeeded"}
        outcomes = [(r[3] or "") for r in attempts(conn, name)]
    seen = len(receiver.seen(path))
    assert seen >= 40
    # every request the receiver saw is explained by an attempt row
    assert len(outcomes) >= seen, (len(outcomes), seen)
    assert any(e.startswith("interrupted") for e in outcomes)


def test_nothing_is_lost_when_the_worker_dies_mid_flight(make_cluster, receiver):
    c = make_cluster()
    name, pid = slow_batch_in_flight(c, receiver, "/crash")
    os.kill(pid, signal.SIGKILL)  # the postmaster restarts everything (crash recovery)

    def recovered():
        try:
            with c.connect() as probe:
                row = probe.execute("SELECT pid FROM pg_stat_activity "
                                    "WHERE backend_type = 'pg_postback worker'").fetchone()
            return row is not None and row[0] != pid
        except Exception:
            return False
    c.wait_for(recovered, timeout=30, what="crash recovery and a new worker")
    assert_all_delivered_and_explained(c, receiver, name, "/crash")


def test_immediate_stop_and_restart_loses_nothing(make_cluster, receiver):
    c = make_cluster()
    name, _ = slow_batch_in_flight(c, receiver, "/stop")
    c.stop("immediate")
    c.start()
    assert_all_delivered_and_explained(c, receiver, name, "/stop")


def test_fast_shutdown_abandons_slow_requests_and_retries_them_after_restart(make_cluster, receiver):
    c = make_cluster()
    # one quick answer first: past the slow start, all five go out at once
    receiver.script("/hang", {"status": 200}, *[{"delay": 8.0, "status": 200}] * 5, {"status": 200})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        name = endpoint(conn, receiver.url("/hang?c={click_id}&tx={transaction_id}"), timeout="30 seconds")
        convert(conn, 1)
        wait_finished(c, conn, name, 1)
        convert(conn, 5)
        c.wait_for(lambda: len(receiver.seen("/hang")) >= 6, what="requests in flight")
    started = time.monotonic()
    c.stop("fast", timeout=30)
    assert time.monotonic() - started < 7
    assert "pg_postback worker shutting down" in c.log()
    c.start()
    with c.connect() as conn:
        rows = wait_finished(c, conn, name, 6, timeout=60)
        assert {r[1] for r in rows} == {"succeeded"}
        outcomes = [r[4] for r in attempts(conn, name)]
    assert outcomes.count("succeeded") == 6 and len(outcomes) >= 11


def test_a_later_status_waits_for_the_earlier_one(cluster, receiver):
    # the approval fails twice before it gets through; the reversal must not overtake it
    receiver.script("/order", {"status": 503}, {"status": 503}, {"status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/order?s={status}&t={transaction_id}"), retry_schedule=["300 ms"],
                        max_attempts=5)
        tx = convert(conn)
        conn.execute("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id = %s", (f"{tx}-1",))
        rows = wait_finished(cluster, conn, name, 2)
    assert [r[1] for r in rows] == ["succeeded", "succeeded"]
    statuses = [r["query"]["s"] for r in receiver.seen("/order")]
    assert statuses == ["approved", "approved", "approved", "reversed"], statuses


def test_nothing_fires_before_commit_or_on_rollback(cluster, receiver):
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/tx?t={transaction_id}"))
        conn.autocommit = False
        convert(conn, 3)
        time.sleep(1.5)  # longer than the poll interval: an uncommitted row must not be sent
        assert receiver.seen("/tx") == []
        conn.rollback()
        conn.autocommit = True
        assert deliveries(conn, name) == []
        conn.autocommit = False
        convert(conn, 2)
        conn.commit()
        conn.autocommit = True
        wait_finished(cluster, conn, name, 2)
    assert len(receiver.seen("/tx")) == 2


def test_sighup_reloads_the_allowlist(make_cluster):
    c = make_cluster()
    other = Receiver(host="127.0.0.2").start()
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
            conn.execute("ALTER SYSTEM SET postback.allowed_targets = '127.0.0.1/32, 127.0.0.2/32'")
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(1.0)
            name = endpoint(conn, f"http://127.0.0.2:{other.port}/reloaded?c={{click_id}}")
            convert(conn)
            [(_, state, _, error)] = wait_finished(c, conn, name, 1)
        assert state == "succeeded", error
        assert len(other.seen("/reloaded")) == 1
    finally:
        other.stop()
