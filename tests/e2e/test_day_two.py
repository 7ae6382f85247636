"""Day two: what an operator does to an endpoint or a delivery never strands or garbles a postback."""

import time

import psycopg
import pytest

from helpers import convert_for, scoped_endpoint
from receiver import Receiver


def deliveries(conn, name):
    return conn.execute(
        "SELECT d.id, d.state, d.attempts, d.url, d.idempotency_key, d.last_error, d.rendered "
        "FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
        "WHERE e.name = %s ORDER BY d.id", (name,)).fetchall()


def wait_states(cluster, conn, name, want):
    """Waits until the deliveries of `name` are in the states `want` (in id order)."""
    return cluster.wait_for(lambda: (lambda rows: rows if [r[1] for r in rows] == want else None)(
        deliveries(conn, name)), what=f"deliveries of {name} in states {want}")


def test_an_edited_endpoint_sends_its_queue_as_it_now_renders_queued_backoff_and_dead(cluster, receiver):
    moved = Receiver().start()
    try:
        receiver.script("/old", {"status": 500}, {"status": 404})
        with cluster.connect() as conn:
            name = scoped_endpoint(conn, receiver.url("/old?c={click_id}"), "edit",
                                   retry_schedule=["1 hour"], max_attempts=5)
            convert_for(conn, name, tx=f"{name}-backoff")
            cluster.wait_for(lambda: [(r[1], r[2]) for r in deliveries(conn, name)] == [("pending", 1)],
                             what="the first attempt")  # 500: waits an hour for its retry
            convert_for(conn, name, tx=f"{name}-dead")
            wait_states(cluster, conn, name, ["pending", "dead"])  # 404: dead at once
            conn.execute("SELECT postback.pause(%s)", (name,))
            convert_for(conn, name, tx=f"{name}-q1")
            convert_for(conn, name, tx=f"{name}-q2")
            before = deliveries(conn, name)
            assert [r[1] for r in before] == ["pending", "dead", "pending", "pending"]
            # the partner moved: another host, port and path, one more value
            conn.execute("UPDATE postback.endpoints SET url_template = %s WHERE name = %s",
                         (moved.url("/new?c={click_id}&tx={transaction_id}"), name))
            after = deliveries(conn, name)
            # queued ones (in backoff included) are rendered again at once, same keys;
            # the dead one keeps what it was until it is resent
            for b, a in zip(before, after):
                assert a[4] == b[4]
            assert [a[3].startswith(moved.url("/new?c=")) for a in after] == [True, False, True, True]
            assert after[0][3].endswith(f"&tx={name}-backoff")
            conn.execute("SELECT postback.resume(%s)", (name,))
            conn.execute("UPDATE postback.deliveries SET next_attempt_at = now() WHERE id = %s", (after[0][0],))
            assert conn.execute("SELECT postback.retry_dead(%s)", (name,)).fetchone()[0] == 1
            final = wait_states(cluster, conn, name, ["succeeded"] * 4)
        sent = sorted(f'{s["path"]}?{s["raw_query"]}' for s in moved.seen())
        assert sent == sorted(r[3][len(moved.url("")):] for r in final), sent
        assert sorted(s["query"]["tx"] for s in moved.seen()) == sorted(
            f"{name}-{t}" for t in ("backoff", "dead", "q1", "q2"))
        assert len(receiver.seen()) == 2  # only the two first attempts went to the old place
        # attempts kept their numbering across the edit
        numbers = conn_attempts(cluster, final[0][0])
        assert numbers == [1, 2]
    finally:
        moved.stop()


def conn_attempts(cluster, delivery_id):
    with cluster.connect() as conn:
        return [r[0] for r in conn.execute(
            "SELECT attempt_no FROM postback.attempts WHERE delivery_id = %s ORDER BY attempt_no", (delivery_id,))]


def test_an_edit_while_the_worker_holds_the_old_settings_never_kills_a_delivery(cluster, receiver):
    moved = Receiver().start()
    try:
        with cluster.connect() as conn:
            name = scoped_endpoint(conn, receiver.url("/a?c={click_id}"), "hot")
            convert_for(conn, name, tx=f"{name}-1")
            wait_states(cluster, conn, name, ["succeeded"])  # the worker now holds the settings
            conn.execute("UPDATE postback.endpoints SET url_template = %s WHERE name = %s",
                         (moved.url("/b?c={click_id}"), name))
            convert_for(conn, name, tx=f"{name}-2")  # within the worker's 1 s settings cache
            rows = wait_states(cluster, conn, name, ["succeeded", "succeeded"])
        assert rows[1][3].startswith(moved.url("/b?c="))
        assert [s["path"] for s in moved.seen()] == ["/b"]
    finally:
        moved.stop()


def test_a_delivery_that_never_rendered_is_rendered_again_when_retried(cluster, receiver):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/m?half={attributes.payout|mul:0.5}&cid={click_id}"), "rr")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, attributes) "
                     "VALUES ('c-rr', %s, %s, '{\"payout\": \"12,50\"}')", (f"{name}-1", name))
        [(did, state, _, url, _, error, rendered)] = deliveries(conn, name)
        assert (state, url, rendered) == ("dead", "", False) and "12,50" in error
        # still unrenderable: refused with the reason, nothing sent, still dead
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            conn.execute("SELECT postback.retry(%s)", (did,))
        assert "does not render" in str(err.value) and "12,50" in str(err.value)
        assert err.value.diag.message_hint.startswith("Fix the endpoint or the conversion")
        assert conn.execute("SELECT postback.retry_dead(%s)", (name,)).fetchone()[0] == 0
        assert deliveries(conn, name)[0][1] == "dead" and receiver.seen("/m") == []
        # the operator fixes the value; the retry renders from the conversion as it is now
        conn.execute("UPDATE postback.conversions SET attributes = '{\"payout\": \"12.50\"}' "
                     "WHERE transaction_id = %s", (f"{name}-1",))
        assert conn.execute("SELECT postback.retry(%s)", (did,)).fetchone()[0] == did
        wait_states(cluster, conn, name, ["succeeded"])
    assert [s["raw_query"] for s in receiver.seen("/m")] == ["half=6.25&cid=c-rr"]


def test_replay_leaves_test_deliveries_out_and_an_edit_retires_a_queued_test(cluster, receiver):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/t?c={click_id}"), "tst")
        conn.execute("SELECT postback.send_test(%s)", (name,))
        convert_for(conn, name, tx=f"{name}-1")
        wait_states(cluster, conn, name, ["succeeded", "succeeded"])
        assert conn.execute("SELECT postback.replay(%s, now() - interval '1 hour')", (name,)).fetchone()[0] == 1
        wait_states(cluster, conn, name, ["succeeded", "succeeded"])
        cluster.wait_for(lambda: len(receiver.seen("/t")) == 3, what="the replay")
        assert sum("TEST-CLICK" in s["raw_query"] for s in receiver.seen("/t")) == 1
        # a test queued behind a pause when the endpoint is edited has nothing to render from
        conn.execute("SELECT postback.pause(%s)", (name,))
        test_id = conn.execute("SELECT postback.send_test(%s)", (name,)).fetchone()[0]
        conn.execute("UPDATE postback.endpoints SET url_template = %s WHERE name = %s",
                     (receiver.url("/t2?c={click_id}"), name))
        state, error = conn.execute("SELECT state, last_error FROM postback.deliveries WHERE id = %s",
                                    (test_id,)).fetchone()
        assert state == "dead" and "run postback.send_test again" in error
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            conn.execute("SELECT postback.retry(%s)", (test_id,))
        assert "postback.send_test" in err.value.diag.message_hint
        conn.execute("SELECT postback.resume(%s)", (name,))
        # test deliveries are purged on their own; the postback stays
        assert conn.execute("SELECT postback.purge_tests()").fetchone()[0] >= 2
        left = conn.execute("SELECT d.conversion_id IS NULL FROM postback.deliveries d "
                            "JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = %s", (name,)).fetchall()
        assert left == [(False,)]


def test_a_signing_endpoint_without_a_live_secret_holds_its_deliveries_until_one_is_given(cluster, receiver):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/signed"), "sec", kind="webhook", signing_scheme="github")
        convert_for(conn, name, 2)
        # nothing is sent and no attempt is spent while there is no secret
        cluster.wait_for(lambda: conn.execute(
            "SELECT held_by FROM postback.endpoint_health WHERE endpoint = %s", (name,)).fetchone()[0],
            what="endpoint_health to say why")
        held_by = conn.execute("SELECT held_by FROM postback.endpoint_health WHERE endpoint = %s", (name,)).fetchone()[0]
        assert held_by.startswith("no live secret"), held_by
        time.sleep(1.5)
        rows = deliveries(conn, name)
        assert [(r[1], r[2]) for r in rows] == [("pending", 0), ("pending", 0)]
        assert receiver.seen("/signed") == []
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) "
                     "SELECT id, 'partner-secret' FROM postback.endpoints WHERE name = %s", (name,))
        wait_states(cluster, conn, name, ["succeeded", "succeeded"])
        assert conn.execute("SELECT held_by FROM postback.endpoint_health WHERE endpoint = %s",
                            (name,)).fetchone()[0] is None
    seen = receiver.seen("/signed")
    assert len(seen) == 2
    assert all(s["headers"]["x-hub-signature-256"].startswith("sha256=") for s in seen)


def test_an_event_no_conversion_has_had_is_named_in_a_notice(cluster):
    notices = []
    with cluster.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        convert_for(conn, "sale")
        scoped = scoped_endpoint(conn, "http://127.0.0.1:9/pb?c={click_id}", "evt")
        conn.execute("UPDATE postback.endpoints SET events = '{sales}' WHERE name = %s", (scoped,))
        conn.execute("UPDATE postback.endpoints SET active = false WHERE name = %s", (scoped,))
    assert any(f'endpoint "{scoped}": no recent conversion has event {{sales}}' in n and "sale" in n
               for n in notices), notices


def test_curl_reproduces_a_delivery_by_hand_and_shows_credentials_to_the_owner_only(cluster, receiver):
    import subprocess
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/hook"), "curl", kind="webhook", signing_scheme="github",
                               headers='{"Authorization": "Bearer tok-123"}')
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) "
                     "SELECT id, 'hook-secret' FROM postback.endpoints WHERE name = %s", (name,))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, attributes) "
                     "VALUES ('c-curl', %s, %s, '{\"note\": \"O''Brien $(id) `x`\"}')", (f"{name}-1", name))
        [(did, *_)] = wait_states(cluster, conn, name, ["succeeded"])
        command = conn.execute("SELECT postback.curl(%s)", (did,)).fetchone()[0]
        assert "Bearer tok-123" in command and "X-Hub-Signature-256: sha256=" in command
        conn.execute("DROP ROLE IF EXISTS curl_op")
        conn.execute("CREATE ROLE curl_op LOGIN")
        conn.execute("SELECT postback.grant_operator('curl_op')")
    # run by hand: the receiver gets the same body and a signature that verifies
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and out.stdout.startswith("HTTP/1.1 200"), out
    first, again = receiver.seen("/hook")
    assert again["body"] == first["body"] and "O'Brien $(id) `x`" in again["body"]
    assert again["headers"]["authorization"] == "Bearer tok-123"
    with cluster.connect() as conn:
        assert conn.execute("SELECT postback.verify(%s, 'hook-secret', 'github', %s)",
                            (again["body"], again["headers"]["x-hub-signature-256"])).fetchone()[0]
    with psycopg.connect(cluster.dsn().replace("user=postgres", "user=curl_op"), autocommit=True) as op:
        shown = op.execute("SELECT postback.curl(%s)", (did,)).fetchone()[0]
        assert "tok-123" not in shown and "[redacted]" in shown and "sha256=" in shown
        # an operator explains a conversion too (no credentials in it)
        rows = op.execute("SELECT endpoint, fired, reason FROM postback.explain(%s) WHERE endpoint = %s",
                          (f"{name}-1", name)).fetchall()
        assert rows == [(name, True, "fired")]


def conn_rows(cluster, database):
    with cluster.connect() as conn:
        row = conn.execute("SELECT running, state FROM postback.worker_status() WHERE database = %s",
                           (database,)).fetchone()
    return row if row and row[1] and "could not connect" in row[1] else None


def test_worker_status_tells_the_truth_in_a_database_it_does_not_serve(cluster, make_cluster):
    with cluster.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS not_served")
        conn.execute("CREATE DATABASE not_served")
    with cluster.connect("not_served") as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        rows = conn.execute("SELECT running, database, hint, role FROM postback.worker_status()").fetchall()
    # this database first, with why no worker serves it; then the workers of the database it serves
    (running, database, hint, _), served, maintenance = rows
    assert served[:3] == (True, "postgres", None) and served[3] == "delivery", served
    assert maintenance[:2] == (True, "postgres") and maintenance[3] == "maintenance", maintenance
    served = served[:3]
    assert running is False and database == "not_served"
    assert "serve postback.database_name = 'postgres', not this database ('not_served')" in hint, hint
    assert "postback.database_name = 'not_served' (or add it to the list)" in hint
    assert served == (True, "postgres", None), served
    with cluster.connect() as conn:
        conn.execute("DROP DATABASE not_served")
    # a name that is no database
    c = make_cluster(settings={"postback.database_name": "'nowhere'"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        running, hint = conn.execute("SELECT running, hint FROM postback.worker_status()").fetchone()
    assert running is False
    assert "postback.database_name = 'nowhere' names no database" in hint, hint
    # and the launcher's row for it says what happened
    row = c.wait_for(lambda: conn_rows(c, "nowhere"), what="the row of 'nowhere'")
    assert row[0] is False and "could not connect to database \"nowhere\"" in row[1], row


def test_a_webhook_that_died_at_the_body_limit_is_never_sent_empty(cluster, receiver):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/big"), "big", kind="webhook",
                               body_template='{"note": "{attributes.note}"}')
        conn.execute("SET postback.max_body_bytes = 1024")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, attributes) "
                     "VALUES ('c', %s, %s, jsonb_build_object('note', repeat('x', 2000)))", (f"{name}-1", name))
        [(did, state, _, _, _, error, rendered)] = deliveries(conn, name)
        assert state == "dead" and rendered is False and "1024" in error, error
        # still over the limit: refused with the reason, nothing sent (0.2.0 sent it signed with an empty body)
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            conn.execute("SELECT postback.retry(%s)", (did,))
        assert "1024" in str(err.value)
        conn.execute("RESET postback.max_body_bytes")
        assert conn.execute("SELECT postback.retry(%s)", (did,)).fetchone()[0] == did
        wait_states(cluster, conn, name, ["succeeded"])
    [seen] = receiver.seen("/big")
    assert "x" * 2000 in seen["body"]


def test_the_worker_keeps_the_metrics_rollup(cluster):
    with cluster.connect() as conn:
        # roll_up writes its state on its first call, a few seconds after the worker starts
        until = cluster.wait_for(lambda: conn.execute("SELECT rolled_until FROM postback.rollup_state").fetchone(),
                                 what="the worker's first roll-up")[0]
        assert until > conn.execute("SELECT now() - interval '1 hour'").fetchone()[0]
