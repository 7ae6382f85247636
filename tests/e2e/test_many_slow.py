"""Many partners slow at once never stall the others: slow start, the slow share, what it costs."""

import time

from helpers import convert_for, scoped_endpoint


def count(conn, names, states):
    return conn.execute(
        "SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
        "WHERE e.name = ANY (%s) AND d.state = ANY (%s)", (names, list(states))).fetchone()[0]


def status(conn):
    return conn.execute("SELECT in_flight, concurrency, slow_endpoints, in_flight_slow "
                        "FROM postback.worker_status()").fetchone()


def test_ten_hanging_partners_with_default_settings_leave_a_fast_one_alone(make_cluster, receiver, hanging):
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        fast = scoped_endpoint(conn, receiver.url("/fast?t={transaction_id}"), "many")
        alone_started = time.monotonic()
        convert_for(conn, fast, 500)
        c.wait_for(lambda: count(conn, [fast], ["succeeded"]) == 500, timeout=30, what="500 alone")
        alone = time.monotonic() - alone_started
        # ten partners that never answer, each with default settings and a backlog
        hung = [scoped_endpoint(conn, hanging.url(f"/h{i}?t={{transaction_id}}"), "many") for i in range(10)]
        for name in hung:
            convert_for(conn, name, 40)
        c.wait_for(lambda: status(conn)[2] >= 10, timeout=10, what="ten slow endpoints")
        in_flight, concurrency, slow_endpoints, in_flight_slow = status(conn)
        assert concurrency == 1024
        # slow start: a partner that never answered holds one request, not its max_in_flight
        assert in_flight_slow == 10 and len(hanging.conns) == 10, (in_flight_slow, len(hanging.conns))
        health = conn.execute("SELECT count(*) FILTER (WHERE slow_since IS NOT NULL), sum(in_flight) "
                              "FROM postback.endpoint_health WHERE endpoint = ANY (%s)", (hung,)).fetchone()
        assert health[0] == 10
        beside_started = time.monotonic()
        convert_for(conn, fast, 500)
        c.wait_for(lambda: count(conn, [fast], ["succeeded"]) == 1000, timeout=30, what="500 beside them")
        beside = time.monotonic() - beside_started
        assert beside <= max(1.5 * alone, alone + 1.0), (beside, alone)
        assert count(conn, hung, ["succeeded", "dead"]) == 0
        conn.execute("UPDATE postback.endpoints SET active = false WHERE name = ANY (%s)", (hung,))


def test_partners_that_answer_slowly_hold_at_most_half_the_capacity(make_cluster, receiver):
    # 0.2.0's failure: ten partners with max_in_flight 8 (80) and 64 sending slots
    c = make_cluster({"postback.concurrency": "64"})
    receiver.script("/slow", {"delay": 2.5})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        slow = [scoped_endpoint(conn, receiver.url(f"/slow?p={i}&t={{transaction_id}}"), "half") for i in range(10)]
        for name in slow:
            convert_for(conn, name, 40)
        fast = scoped_endpoint(conn, receiver.url("/quick?t={transaction_id}"), "half")
        # past their first answers (slow start), the slow ones would take 80 slots
        c.wait_for(lambda: count(conn, slow, ["succeeded"]) >= 10, timeout=15, what="first slow answers")
        peak = 0
        started = time.monotonic()
        convert_for(conn, fast, 300)
        while count(conn, [fast], ["succeeded"]) < 300:
            _, concurrency, slow_endpoints, in_flight_slow = status(conn)
            peak = max(peak, in_flight_slow)
            assert time.monotonic() - started < 10, "the fast partner is stalled"
            time.sleep(0.05)
        assert concurrency == 64 and slow_endpoints >= 10
        assert 0 < peak <= 32, peak
        assert receiver.max_active["/slow"] <= 32, receiver.max_active
        # every slow delivery still arrives, within the share
        c.wait_for(lambda: count(conn, slow, ["succeeded"]) == 400, timeout=90, what="all slow deliveries")
        assert receiver.max_active["/slow"] <= 32, receiver.max_active
