"""Operating from SQL: retry, replay, send_test, pause/resume, purge, the views, and who may call what."""

import json
import time

import psycopg
import pytest

from helpers import convert_for, scoped_endpoint


def endpoint(conn, url, **options):
    return scoped_endpoint(conn, url, "op", **options)


def convert(conn, event, n=1):
    return convert_for(conn, event, n)


def states(conn, name):
    return conn.execute(
        "SELECT d.id, d.state, d.attempts FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
        "WHERE e.name = %s ORDER BY d.id", (name,)).fetchall()


def settled(cluster, conn, name, count, state=None):
    def done():
        rows = states(conn, name)
        ok = len(rows) == count and all(r[1] in ((state,) if state else ("succeeded", "dead")) for r in rows)
        return rows if ok else None
    return cluster.wait_for(done, what=f"{count} settled deliveries of {name}")


def test_retry_and_retry_dead_send_again_and_keep_numbering(cluster, receiver):
    receiver.script("/gone", {"status": 404}, {"status": 404}, {"status": 200}, {"status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/gone?c={click_id}"))
        convert(conn, name, 2)
        rows = settled(cluster, conn, name, 2, "dead")
        assert conn.execute("SELECT postback.retry(%s)", (rows[0][0],)).fetchone()[0] == rows[0][0]
        cluster.wait_for(lambda: states(conn, name)[0][1] == "succeeded", what="the retried delivery")
        numbers = [r[0] for r in conn.execute(
            "SELECT attempt_no FROM postback.attempts WHERE delivery_id = %s ORDER BY attempt_no", (rows[0][0],))]
        assert numbers == [1, 2]
        # a pending delivery is not retried twice
        conn.execute("SELECT postback.pause(%s)", (name,))
        conn.execute("SELECT postback.retry(%s)", (rows[0][0],))
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("SELECT postback.retry(%s)", (rows[0][0],))
        conn.execute("SELECT postback.resume(%s)", (name,))
        cluster.wait_for(lambda: states(conn, name)[0][1] == "succeeded", what="the second retry")
        assert conn.execute("SELECT postback.retry_dead(%s)", (name,)).fetchone()[0] == 1
        settled(cluster, conn, name, 2, "succeeded")
        with pytest.raises(psycopg.errors.NoDataFound):
            conn.execute("SELECT postback.retry(-1)")
        with pytest.raises(psycopg.errors.NoDataFound) as err:
            conn.execute("SELECT postback.retry_dead('no-such-endpoint')")
        assert 'unknown endpoint "no-such-endpoint"' in str(err.value)


def test_replay_resends_the_same_requests_and_keys(cluster, receiver):
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/wh"), kind="webhook")
        convert(conn, name, 3)
        settled(cluster, conn, name, 3, "succeeded")
        first = receiver.seen("/wh")
        assert conn.execute("SELECT postback.replay(%s, now() - interval '1 hour')", (name,)).fetchone()[0] == 3
        cluster.wait_for(lambda: len(receiver.seen("/wh")) == 6, what="the replay")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT postback.replay(%s, now(), now() - interval '1 day')", (name,))
    seen = receiver.seen("/wh")
    keys = [s["headers"]["idempotency-key"] for s in seen]
    assert sorted(keys[:3]) == sorted(keys[3:])
    assert sorted(s["body"] for s in first) == sorted(s["body"] for s in seen[3:])


def test_send_test_is_delivered_with_marked_sample_values(cluster, receiver):
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/pb?cid={click_id}&amount={amount}&p={partner}&s={click.sub1}"),
                        partners=["net-x"])
        delivery = conn.execute("SELECT postback.send_test(%s)", (name,)).fetchone()[0]
        cluster.wait_for(lambda: len(receiver.seen("/pb")) == 1, what="the test postback")
        conn.execute("SELECT postback.send_test(%s, %s)", (name, json.dumps({"amount": "12.50", "click": {"sub1": "k"}})))
        cluster.wait_for(lambda: len(receiver.seen("/pb")) == 2, what="the overridden test postback")
        conversion = conn.execute("SELECT conversion_id FROM postback.deliveries WHERE id = %s", (delivery,)).fetchone()
        assert conversion == (None,)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT postback.send_test(%s, '[1]')", (name,))
    first, second = [s["query"] for s in receiver.seen("/pb")]
    assert first["cid"].startswith("TEST-CLICK-") and first["amount"] == "0.00" and first["p"] == "net-x"
    assert second["amount"] == "12.50" and second["s"] == "k"


def test_pause_keeps_deliveries_waiting_without_spending_attempts(cluster, receiver):
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/p?c={click_id}"), max_age="2 seconds")
        conn.execute("SELECT postback.pause(%s)", (name,))
        convert(conn, name, 3)
        time.sleep(2.5)  # longer than max_age: paused time must not count
        assert [(r[1], r[2]) for r in states(conn, name)] == [("pending", 0)] * 3
        assert receiver.seen("/p") == []
        health = conn.execute("SELECT paused, pending FROM postback.endpoint_health WHERE endpoint = %s",
                              (name,)).fetchone()
        assert health == (True, 3)
        conn.execute("SELECT postback.resume(%s)", (name,))
        settled(cluster, conn, name, 3, "succeeded")
        assert len(receiver.seen("/p")) == 3


def test_purge_deletes_only_old_finished_deliveries_in_bounded_batches(cluster, receiver):
    receiver.script("/pg", *([{"status": 404}] * 5), {"status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/pg?c={click_id}"))
        convert(conn, name, 25)
        settled(cluster, conn, name, 25)
        conn.execute("UPDATE postback.deliveries d SET completed_at = now() - interval '40 days' FROM postback.endpoints e "
                     "WHERE e.id = d.endpoint_id AND e.name = %s", (name,))
        dead = conn.execute("SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
                            "WHERE e.name = %s AND d.state = 'dead'", (name,)).fetchone()[0]
        assert dead == 5
        # one bounded batch, then the rest; dead ones stay unless asked
        assert conn.execute("SELECT postback.purge('30 days', 7, false, 1)").fetchone()[0] == 7
        assert conn.execute("SELECT postback.purge('30 days', 7)").fetchone()[0] == 13
        assert len(states(conn, name)) == 5
        assert conn.execute("SELECT postback.purge('30 days', 100, include_dead => true)").fetchone()[0] == 5
        assert states(conn, name) == []
        orphans = conn.execute("SELECT count(*) FROM postback.attempts a WHERE NOT EXISTS "
                               "(SELECT 1 FROM postback.deliveries d WHERE d.id = a.delivery_id)").fetchone()[0]
        assert orphans == 0
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT postback.purge('30 days', 0)")


def test_views_answer_and_roles_hold(cluster, receiver):
    receiver.script("/h", {"status": 500}, {"status": 200})
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/h?c={click_id}"), retry_schedule=["100 ms"], max_attempts=1)
        convert(conn, name, 3)
        settled(cluster, conn, name, 3)
        health = conn.execute(
            "SELECT deliveries_24h, succeeded_24h, dead_24h, success_rate_24h, consecutive_failures, pending "
            "FROM postback.endpoint_health WHERE endpoint = %s", (name,)).fetchone()
        assert health[:3] == (3, 2, 1) and float(health[3]) == pytest.approx(2 / 3, abs=1e-3) and health[5] == 0
        per_endpoint = conn.execute(
            "SELECT deliveries_finished, deliveries_succeeded FROM postback.metrics "
            "WHERE period = '24h' AND endpoint = %s", (name,)).fetchone()
        assert per_endpoint == (3, 2)
        assert conn.execute("SELECT count(*) FROM postback.metrics WHERE breakdown = 'total'"
                            ).fetchone()[0] == 3
        # conversion figures only on the total rows; per-endpoint rows carry delivery figures and dead counts
        assert conn.execute("SELECT conversions, dedup_rate, deliveries_dead FROM postback.metrics "
                            "WHERE period = '24h' AND endpoint = %s", (name,)).fetchone() == (None, None, 1)
        assert conn.execute("SELECT count(*) FROM postback.metrics WHERE breakdown = 'total' AND conversions IS NULL"
                            ).fetchone()[0] == 0
        dead = conn.execute("SELECT last_status_code, attempts FROM postback.dead_letters WHERE endpoint = %s",
                            (name,)).fetchall()
        assert dead == [(500, 1)]
        for role in ("ops_op", "ops_an"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("SELECT postback.grant_operator('ops_op'), postback.grant_analyst('ops_an')")
        dead_id = conn.execute("SELECT delivery_id FROM postback.dead_letters WHERE endpoint = %s", (name,)).fetchone()[0]
    try:
        dsn = cluster.dsn()
        with psycopg.connect(dsn.replace("user=postgres", "user=ops_an"), autocommit=True) as an:
            for view in ("endpoint_health", "metrics", "dead_letters", "match_rate", "delivery_summary"):
                an.execute(f"SELECT * FROM postback.{view}").fetchall()
            for sql in (f"SELECT postback.retry({dead_id})", f"SELECT postback.replay('{name}', now() - interval '1 day')",
                        f"SELECT postback.pause('{name}')", "SELECT postback.purge('1 day')",
                        f"SELECT postback.send_test('{name}')"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    an.execute(sql)
        with psycopg.connect(dsn.replace("user=postgres", "user=ops_op"), autocommit=True) as op:
            assert op.execute(f"SELECT postback.retry({dead_id})").fetchone()[0] == dead_id
            op.execute(f"SELECT postback.pause('{name}')")
            op.execute(f"SELECT postback.resume('{name}')")
            for sql in ("SELECT postback.purge('1 day')",
                        f"UPDATE postback.endpoints SET active = false WHERE name = '{name}'",
                        "DELETE FROM postback.deliveries"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    op.execute(sql)
    finally:
        with cluster.connect() as conn:
            for role in ("ops_op", "ops_an"):
                conn.execute(f"SELECT postback.revoke_access('{role}')")
                conn.execute(f"DROP ROLE {role}")


def test_the_maintenance_worker_applies_retention_and_keeps_the_figures(make_cluster, receiver):
    """postback.retention: the maintenance worker deletes succeeded deliveries that finished
    longer ago (with their attempts), keeps dead, recent and unfinished ones, and rolls
    up first, so postback.metrics says the same after the purge."""
    c = make_cluster({"postback.retention": "0"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        receiver.script("/ret", *([{"status": 404}] * 4), {"status": 200})
        conn.execute("INSERT INTO postback.endpoints (name, url_template, events) VALUES ('ret', %s, '{ret}')",
                     (receiver.url("/ret?c={click_id}"),))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                     "SELECT 'r' || g, 'ret-' || g, 'ret' FROM generate_series(1, 40) g")
        c.wait_for(lambda: conn.execute("SELECT count(*) FROM postback.deliveries "
                                        "WHERE state IN ('succeeded', 'dead')").fetchone()[0] == 40,
                   what="40 finished deliveries")
        # 30 of them finished two hours ago (4 of those dead), 10 just now
        conn.execute("UPDATE postback.deliveries SET completed_at = now() - interval '2 hours', "
                     "created_at = now() - interval '2 hours' "
                     "WHERE id IN (SELECT id FROM postback.deliveries ORDER BY state = 'dead' DESC, id LIMIT 30)")
        # and one delivery still waiting from two hours ago
        conn.execute("SELECT postback.pause('ret')")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, created_at) "
                     "VALUES ('r0', 'ret-0', 'ret', now() - interval '2 hours')")
        old_ok = [r[0] for r in conn.execute(
            "SELECT id FROM postback.deliveries WHERE state = 'succeeded' "
            "AND completed_at < now() - interval '1 hour'")]
        assert len(old_ok) == 26, conn.execute("SELECT state, attempts, last_error, completed_at < now() - interval '1 hour' FROM postback.deliveries").fetchall()
        kept = conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0] - 26
        conn.execute("SELECT postback.roll_up()")
        before = conn.execute("SELECT deliveries_finished, deliveries_dead FROM postback.metrics "
                              "WHERE period = 'all' AND breakdown = 'total'").fetchone()
        # the maintenance worker purges 10 s after it starts: keep an hour, start it again
        conn.execute("ALTER SYSTEM SET postback.retention = '1h'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE backend_type = 'pg_postback maintenance'")
        c.wait_for(lambda: conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0] == kept,
                   timeout=40, what="the old succeeded deliveries to be purged")
        assert conn.execute("SELECT count(*) FROM postback.deliveries WHERE id = ANY (%s)", (old_ok,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM postback.attempts WHERE delivery_id = ANY (%s)",
                            (old_ok,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FILTER (WHERE state = 'dead'), count(*) FILTER (WHERE state = 'pending') "
                            "FROM postback.deliveries").fetchone() == (4, 1)
        assert conn.execute("SELECT deliveries_finished, deliveries_dead FROM postback.metrics "
                            "WHERE period = 'all' AND breakdown = 'total'").fetchone() == before
        assert "purged 26 finished deliveries" in c.log()


def test_autovacuum_sees_the_workers_writes(cluster, receiver):
    """The worker's updates of deliveries and inserts of attempts reach the table
    statistics that autovacuum reads (a background worker has to flush them itself)."""
    with cluster.connect() as conn:
        name = endpoint(conn, receiver.url("/stats?c={click_id}"))
        before = conn.execute("SELECT coalesce(n_tup_ins, 0) FROM pg_stat_user_tables "
                              "WHERE relid = 'postback.attempts'::regclass").fetchone()[0]
        convert(conn, name, 20)
        settled(cluster, conn, name, 20, "succeeded")
        cluster.wait_for(lambda: conn.execute(
            "SELECT a.n_tup_ins >= %s + 20 AND d.n_tup_upd > 0 FROM pg_stat_user_tables a, pg_stat_user_tables d "
            "WHERE a.relid = 'postback.attempts'::regclass AND d.relid = 'postback.deliveries'::regclass",
            (before,)).fetchone()[0] is True,
            timeout=10, what="the worker's writes in pg_stat_user_tables")


def test_without_citus_distribute_refuses_and_cluster_worker_status_shows_this_node(cluster):
    """Distributed mode needs Citus: without it distribute() refuses (feature_not_supported)
    and changes nothing; cluster_worker_status() answers with this node's workers."""
    with cluster.connect() as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
            conn.execute("SELECT postback.distribute()")
        assert "needs Citus" in str(e.value)
        assert conn.execute("SELECT postback.is_distributed()").fetchone()[0] is False
        rows = conn.execute("SELECT node, role, running FROM postback.cluster_worker_status()").fetchall()
        assert ("this node", "delivery", True) in rows and ("this node", "maintenance", True) in rows, rows
