"""Per-endpoint success and retry statuses, a body pattern with the delivery's values, a first-attempt delay."""

import time


from helpers import convert_for, scoped_endpoint


def endpoint(conn, url, **options):
    return scoped_endpoint(conn, url, "rule", **options)


def convert(conn, event, tx=None):
    return convert_for(conn, event, tx=tx)


def outcomes(cluster, conn, name, n=1):
    def done():
        # one statement, one snapshot: the attempts and the states it counts agree
        rows, final = conn.execute(
            "SELECT (SELECT coalesce(json_agg(json_build_array(a.status_code, a.outcome) ORDER BY a.id), '[]')"
            "          FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id"
            "          JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = %(n)s),"
            "       (SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id"
            "         WHERE e.name = %(n)s AND d.state IN ('succeeded', 'dead'))", {"n": name}).fetchone()
        return [tuple(r) for r in rows] if final == n else None
    return cluster.wait_for(done, what=f"{name} to settle")


def test_success_and_retry_statuses_per_endpoint(cluster, receiver):
    receiver.script("/cb", {"status": 302, "headers": {"Location": "/elsewhere"}})
    receiver.script("/lp", {"status": 409}, {"status": 200})
    receiver.script("/tj", {"status": 403})
    with cluster.connect() as conn:
        chartboost = endpoint(conn, receiver.url("/cb?c={click_id}"), success_statuses=["200-302"])
        leanplum = endpoint(conn, receiver.url("/lp?c={click_id}"), retry_statuses=["409", "500-599"],
                            retry_schedule=["100 ms"])
        tapjoy = endpoint(conn, receiver.url("/tj?c={click_id}"), retry_schedule=["100 ms"])
        for name in (chartboost, leanplum, tapjoy):
            convert(conn, name)
        assert outcomes(cluster, conn, chartboost) == [(302, "succeeded")]
        assert outcomes(cluster, conn, leanplum) == [(409, "retry"), (200, "succeeded")]
        assert outcomes(cluster, conn, tapjoy) == [(403, "dead")]
    assert receiver.seen("/elsewhere") == []


def test_body_pattern_with_the_deliverys_own_id(cluster, receiver):
    """ironSource acknowledges with `<EVENT_ID>:OK`: another delivery's OK must not count."""
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/is?e={transaction_id}"), success_body_pattern="^{transaction_id}:OK$",
                        retry_schedule=["100 ms"], max_attempts=2)
        receiver.script("/is", {"body": "ev.1:OK"})
        convert(conn, name, "ev.1")
        assert outcomes(cluster, conn, name) == [(200, "succeeded")]
        receiver.script("/is", {"body": "evX1:OK"})  # '.' must match literally, not any character
        convert(conn, name, "ev.2")
        rows = outcomes(cluster, conn, name, 2)
    assert rows[1:] == [(200, "retry"), (200, "dead")]


def test_initial_delay_holds_the_first_attempt(cluster, receiver):
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/k?c={click_id}"), initial_delay="1.5 seconds")
        committed = time.time()
        convert(conn, name)
        outcomes(cluster, conn, name)
    [first] = receiver.seen("/k")
    assert first["time"] - committed >= 1.4, first["time"] - committed


def test_a_verifier_hashed_with_the_secret_is_computed_at_send_time(cluster, receiver):
    """Tapjoy's verifier: md5 of id:snuid:currency:secret; the secret never reaches a stored row."""
    import hashlib
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url(
            "/tj?id={transaction_id}&verifier={hash:md5:transaction_id,':',attributes.snuid,':',currency,':',secret}"))
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) "
                     "SELECT id, 'tj-s3cret' FROM postback.endpoints WHERE name = %s", (name,))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, currency, attributes) "
                     "VALUES ('c', 'tj-1', %s, 'USD', '{\"snuid\": \"user 7\"}')", (name,))
        assert outcomes(cluster, conn, name) == [(200, "succeeded")]
        stored = conn.execute("SELECT d.url FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
                              "WHERE e.name = %s", (name,)).fetchone()[0]
    [got] = receiver.seen("/tj")
    assert got["query"]["verifier"] == hashlib.md5(b"tj-1:user 7:USD:tj-s3cret").hexdigest()
    assert "tj-s3cret" not in stored and got["query"]["verifier"] not in stored
