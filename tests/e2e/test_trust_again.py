"""Trust, second pass: each defect of the review, written as the attack, on real clusters."""

import base64
import hashlib
import json
import subprocess
import time
import urllib.parse

import psycopg
import pytest

from cluster import PG_BIN, as_postgres
from helpers import scoped_endpoint

# what a value carried in 0.2.0 to have the worker print sha256(secret)
MARK = "~pgpb-hash~sha256~" + base64.urlsafe_b64encode(b"[null]").decode().rstrip("=") + "~"
SECRET = "k" * 80  # longer than a SHA-256 block: its digest would be the HMAC key itself


def test_a_value_shaped_like_a_hash_marker_is_sent_as_text_and_never_signed(cluster, receiver):
    """The marker in every value source: click attributes, conversion attributes,
    click_id, transaction_id and send_test overrides."""
    assert MARK == "~pgpb-hash~sha256~W251bGxd~"
    forbidden = hashlib.sha256(SECRET.encode()).hexdigest()
    receiver.script("/oracle", {"echo": True})
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url(
            "/oracle?tx={transaction_id}&cid={click_id}&a={attributes.sub}&k={click.sub}"
            "&v={hash:sha256:transaction_id,':',secret}"), "oracle")
        eid = conn.execute("SELECT id FROM postback.endpoints WHERE name = %s", (name,)).fetchone()[0]
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) VALUES (%s, %s)", (eid, SECRET))
        conn.execute("INSERT INTO postback.clicks (click_id, attributes) VALUES (%s, %s)",
                     (MARK, json.dumps({"sub": MARK})))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, attributes) "
                     "VALUES (%s, %s, %s, %s)", (MARK, MARK, name, json.dumps({"sub": MARK})))
        conversion = conn.execute("SELECT id FROM postback.conversions WHERE transaction_id = %s", (MARK,)).fetchone()[0]
        conn.execute("SELECT postback.send_test(%s, %s)", (name, json.dumps(
            {"click_id": MARK, "transaction_id": MARK + "t", "attributes": {"sub": MARK}, "click": {"sub": MARK}})))
        cluster.wait_for(lambda: len(receiver.seen("/oracle")) == 2, what="both requests")
        (preview_url,) = conn.execute("SELECT url FROM postback.preview(%s, %s)", (name, conversion)).fetchone()
        cluster.wait_for(lambda: conn.execute(
            "SELECT count(*) FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id "
            "WHERE d.endpoint_id = %s", (eid,)).fetchone()[0] == 2, what="both attempts recorded")
        stored = conn.execute(
            "SELECT string_agg(coalesce(a.response_body, '') || coalesce(a.error, '') || d.url, ' ') "
            "FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id WHERE d.endpoint_id = %s",
            (eid,)).fetchone()[0]
    for got in receiver.seen("/oracle"):
        q = got["query"]
        assert q["cid"] == q["a"] == q["k"] == MARK, q
        # the one digest the template asked for, over the transaction id sent
        assert q["v"] == hashlib.sha256(f"{q['tx']}:{SECRET}".encode()).hexdigest(), q
        assert forbidden not in got["raw_query"]
    assert forbidden not in preview_url and MARK in urllib.parse.unquote(preview_url), preview_url
    assert forbidden not in stored


def test_a_status_line_beyond_599_is_recorded_and_retried_not_wedged(cluster, receiver):
    receiver.script("/odd", {"status": 777}, {"status": 200})
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/odd?c={click_id}"), "odd", retry_schedule=["100 ms"])
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c', 'odd-1', %s)",
                     (name,))
        # the later lifecycle postback waits behind the first, so it must not wedge
        conn.execute("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id = 'odd-1'")
        cluster.wait_for(lambda: conn.execute(
            "SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.name = %s AND d.state = 'succeeded'", (name,)).fetchone()[0] == 2, what="both deliveries")
        first = conn.execute(
            "SELECT a.status_code, a.error, a.outcome FROM postback.attempts a "
            "JOIN postback.deliveries d ON d.id = a.delivery_id JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.name = %s ORDER BY a.started_at LIMIT 1", (name,)).fetchone()
    assert first[0] is None and "777" in first[1] and first[2] == "retry", first


def test_a_redirect_never_puts_the_signed_url_into_readable_rows(cluster, receiver):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/moved?c={click_id}"), "moved",
                               signing_scheme="hmac-sha256-hex")
        eid = conn.execute("SELECT id FROM postback.endpoints WHERE name = %s", (name,)).fetchone()[0]
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) VALUES (%s, 'redirect-secret')", (eid,))
        # an http→https redirect echoes the whole signed URL
        receiver.script("/moved", {"status": 301, "headers": {
            "Location": "https://127.0.0.1/moved?c=secret-click&ts=1&sig=deadbeefcafe"}})
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                     "VALUES ('secret-click', 'moved-1', %s)", (name,))
        cluster.wait_for(lambda: conn.execute(
            "SELECT state FROM postback.deliveries WHERE endpoint_id = %s", (eid,)).fetchone()[0] == "dead",
            what="the redirect to be judged")
        rows = conn.execute(
            "SELECT (SELECT json_agg(a) FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id "
            "         WHERE d.endpoint_id = %(e)s)::text, "
            "       (SELECT json_agg(d.last_error) FROM postback.deliveries d WHERE d.endpoint_id = %(e)s)::text, "
            "       (SELECT json_agg(s) FROM postback.endpoint_state s WHERE s.endpoint_id = %(e)s)::text, "
            "       (SELECT json_agg(h) FROM postback.endpoint_health h WHERE h.endpoint = %(n)s)::text, "
            "       (SELECT json_agg(l) FROM postback.dead_letters l WHERE l.endpoint = %(n)s)::text",
            {"e": eid, "n": name}).fetchone()
    text = " ".join(r or "" for r in rows)
    assert "redirect not followed" in text and "https://127.0.0.1/moved?…" in text, text
    assert "deadbeefcafe" not in text and "sig=" not in text and "secret-click&" not in text, text


def test_a_stranded_lease_of_the_live_worker_comes_back(cluster, receiver):
    """A delivery the worker lost track of (a dead sending thread in 0.2.0) stays
    in_flight under the live worker's pid; once its lease expires it is sent."""
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/stranded?c={click_id}"), "stranded")
        conn.execute("SELECT postback.pause(%s)", (name,))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c', 'str-1', %s)",
                     (name,))
        conn.execute(
            "UPDATE postback.deliveries d SET state = 'in_flight', attempts = 1, "
            "       lease_expires_at = now() - interval '1 second', "
            "       leased_by = (SELECT pid FROM postback.worker_status() WHERE role = 'delivery') "
            "  FROM postback.endpoints e WHERE e.id = d.endpoint_id AND e.name = %s", (name,))
        conn.execute("SELECT postback.resume(%s)", (name,))
        cluster.wait_for(lambda: len(receiver.seen("/stranded")) == 1, timeout=20, what="the stranded delivery")
        cluster.wait_for(lambda: conn.execute(
            "SELECT d.state FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.name = %s", (name,)).fetchone()[0] == "succeeded", what="its success")


def test_a_success_pattern_too_long_once_filled_fails_its_delivery_with_the_reason(cluster, receiver):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/pat?c={click_id}"), "pat",
                               success_body_pattern="ok-{attributes.token}")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, attributes) "
                     "VALUES ('c', 'pat-long', %s, %s), ('c', 'pat-short', %s, %s)",
                     (name, json.dumps({"token": "x" * 300_000}), name, json.dumps({"token": "y"})))
        rows = dict(conn.execute(
            "SELECT c.transaction_id, d.state || ': ' || coalesce(d.last_error, '') FROM postback.deliveries d "
            "JOIN postback.conversions c ON c.id = d.conversion_id JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.name = %s", (name,)).fetchall())
        assert rows["pat-long"].startswith("dead: success_body_pattern") and "limit" in rows["pat-long"], rows
        # the other row of the same statement goes on, and its 2xx without the pattern is no success
        cluster.wait_for(lambda: len(receiver.seen("/pat")) >= 1, what="the short one")
    assert len(receiver.seen("/pat")) >= 1


def test_deeply_nested_attributes_are_refused_when_written_and_block_no_import(cluster):
    deep = json.dumps({"sub": json.loads("[" * 200 + "]" * 200)})
    with cluster.connect() as conn:
        with pytest.raises(psycopg.errors.CheckViolation) as e:
            conn.execute("INSERT INTO postback.clicks (click_id, attributes) VALUES ('deep-click', %s)", (deep,))
        assert "clicks.attributes" in str(e.value) and "32" in str(e.value)
        with pytest.raises(psycopg.errors.CheckViolation) as e:
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, attributes) "
                         "VALUES ('c', 'deep-1', %s)", (deep,))
        assert "conversions.attributes" in str(e.value)
        # an import of ordinary rows is untouched
        conn.execute("INSERT INTO postback.clicks (click_id, attributes) VALUES ('ok-click', %s)",
                     (json.dumps({"a": [[[1]]]}),))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                     "SELECT 'ok-click', 'deep-ok-' || g FROM generate_series(1, 50) g")
        assert conn.execute("SELECT count(*) FROM postback.conversions WHERE transaction_id LIKE 'deep-ok-%'").fetchone()[0] == 50


def test_a_format_chrono_cannot_apply_is_refused_when_the_endpoint_is_defined(cluster):
    with cluster.connect() as conn:
        for bad in ["%4", "%.x", "%:x", "%3x"]:
            with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
                conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES (%s, %s)",
                             ("fmt-" + bad, "https://n.test/?t={occurred_at|format:" + bad + "}"))
            assert "format" in str(e.value), str(e.value)


def test_a_delivery_that_died_at_enqueue_is_never_sent_by_retry_and_preview_says_why(cluster, receiver):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, receiver.url("/never?p={attributes.n|mul:2}"), "never")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, attributes) "
                     "VALUES ('c', 'never-2', %s, '{\"n\": \"many\"}')", (name,))
        (did, state, rendered, why, url) = conn.execute(
            "SELECT d.id, d.state, d.rendered, d.last_error, d.url FROM postback.deliveries d "
            "JOIN postback.conversions c ON c.id = d.conversion_id JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE c.transaction_id = 'never-2' AND e.name = %s", (name,)).fetchone()
        assert (state, rendered, url) == ("dead", False, ""), (state, rendered, url)
        assert "not a number" in why, why
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as e:
            conn.execute("SELECT postback.retry(%s)", (did,))
        assert "does not render" in str(e.value) and "not a number" in str(e.value)
        assert conn.execute("SELECT postback.retry_dead(%s)", (name,)).fetchone()[0] == 0
        conversion = conn.execute("SELECT id FROM postback.conversions WHERE transaction_id = 'never-2'").fetchone()[0]
        (url, error) = conn.execute("SELECT url, error FROM postback.preview(%s, %s)", (name, conversion)).fetchone()
        assert url is None and "not a number" in error, (url, error)
    time.sleep(0.5)
    assert receiver.seen("/never") == []


def test_pg_restore_in_parallel_keeps_every_conversion_as_a_serial_one_does(make_cluster, receiver):
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        for n in ("a", "b"):
            conn.execute("INSERT INTO postback.endpoints (name, url_template, paused_at) VALUES (%s, %s, now())",
                         (n, receiver.url(f"/{n}?c={{click_id}}")))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                     "SELECT 'c' || g, 'par-' || g FROM generate_series(1, 20000) g")
        before = conn.execute("SELECT (SELECT count(*) FROM postback.conversions), "
                              "(SELECT count(*) FROM postback.deliveries)").fetchone()
        assert before == (20000, 40000)
        # half of them three days old and rolled up: the rollup and its state are dumped too
        conn.execute("UPDATE postback.conversions SET created_at = now() - interval '3 days' WHERE id % 2 = 0")
        conn.execute("SELECT postback.roll_up('1 year')")
        counted = conn.execute("SELECT conversions FROM postback.match_rate WHERE overall").fetchone()[0]
        assert counted == 20000
        conn.execute("CREATE DATABASE serial")
        conn.execute("CREATE DATABASE parallel")
    dump = f"{c.datadir}/dump.pgc"
    base = ["-h", "127.0.0.1", "-p", str(c.port), "-U", "postgres"]
    as_postgres([f"{PG_BIN}/pg_dump", *base, "-Fc", "-f", dump, "postgres"])
    as_postgres([f"{PG_BIN}/pg_restore", *base, "--exit-on-error", "-d", "serial", dump])
    as_postgres([f"{PG_BIN}/pg_restore", *base, "-j", "4", "-d", "parallel", dump])
    for db in ("serial", "parallel"):
        with c.connect(db) as conn:
            after = conn.execute("SELECT (SELECT count(*) FROM postback.conversions), "
                                 "(SELECT count(*) FROM postback.deliveries)").fetchone()
            assert after == before, (db, after)
            # restored rows are not counted a second time beside the restored rollup
            assert conn.execute("SELECT conversions FROM postback.match_rate WHERE overall").fetchone()[0] == counted
            # and new conversions are enqueued as before
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('n', 'after-restore')")
            assert conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0] == before[1] + 2
