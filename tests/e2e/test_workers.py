"""Several workers per database and several databases: one owner per endpoint,
no duplicate sends, lifecycle order kept, nothing lost when a worker dies, reload."""

import collections
import os
import signal
import time

from helpers import scoped_endpoint


def workers(conn):
    return conn.execute("SELECT database, worker, workers, pid, running, state FROM postback.worker_status() "
                        "WHERE worker IS NOT NULL ORDER BY database, worker").fetchall()


def running_pids(conn, database="postgres"):
    return [w[3] for w in workers(conn) if w[0] == database and w[4]]


def reload(conn, **settings):
    for key, value in settings.items():
        conn.execute(f"ALTER SYSTEM SET postback.{key} = '{value}'")
    conn.execute("SELECT pg_reload_conf()")


def finished(conn, names):
    return conn.execute(
        "SELECT count(*) FILTER (WHERE d.state IN ('succeeded', 'dead')), count(*) FROM postback.deliveries d "
        "JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = ANY (%s)", (names,)).fetchone()


def all_done(conn, names):
    done, total = finished(conn, names)
    return total > 0 and done == total


def lifecycle(conn, names, n):
    """n conversions per endpoint, each pending then approved then (for half) reversed."""
    for name in names:
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, status) "
                     "SELECT 'c', %s || '-' || g, %s, 'pending' FROM generate_series(1, %s) g", (name, name, n))
    for name in names:
        conn.execute("UPDATE postback.conversions SET status = 'approved' WHERE event = %s", (name,))
    for name in names:
        conn.execute("UPDATE postback.conversions SET status = 'reversed' "
                     "WHERE event = %s AND right(transaction_id, 1) IN ('1', '3', '5', '7', '9')", (name,))


def check_sends(receiver, names, n):
    """Every (endpoint, conversion, status) received once and each conversion's statuses in order."""
    by_key = collections.Counter()
    order = collections.defaultdict(list)
    for r in receiver.seen():
        q = r["query"]
        if q.get("e") in names:
            by_key[(q["e"], q["t"], q["s"])] += 1
            order[(q["e"], q["t"])].append(q["s"])
    dupes = {k: v for k, v in by_key.items() if v > 1}
    assert not dupes, list(dupes.items())[:5]
    assert len(order) == len(names) * n, len(order)
    for (_, t), statuses in order.items():
        expected = ["pending", "approved"] + (["reversed"] if t[-1] in "13579" else [])
        assert statuses == expected, (t, statuses)


def test_two_workers_share_the_endpoints_without_duplicates_and_keep_order(make_cluster, receiver):
    c = make_cluster({"postback.workers": "2"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        rows = c.wait_for(lambda: [w for w in workers(conn) if w[4]] if len(running_pids(conn)) == 2 else None,
                          what="two workers")
        assert [(w[0], w[1], w[2]) for w in rows] == [("postgres", 1, 2), ("postgres", 2, 2)]
        # and one maintenance worker for the database (roll-up, purge), which delivers nothing
        c.wait_for(lambda: conn.execute("SELECT running, state FROM postback.worker_status() "
                                        "WHERE role = 'maintenance'").fetchall() == [
            (True, "maintaining: roll-up every minute, purge every hour, auto-disable")], what="the maintenance worker")
        names = [scoped_endpoint(conn, receiver.url("/w?e={event}&t={transaction_id}&s={status}"), "two",
                                 max_in_flight=4) for _ in range(6)]
        lifecycle(conn, names, 40)
        c.wait_for(lambda: all_done(conn, names), timeout=60, what="every delivery finished")
        check_sends(receiver, names, 40)
        # both workers sent, each only its own endpoints (id modulo 2)
        stats = conn.execute("SELECT worker, sent FROM postback.worker_status() WHERE worker IS NOT NULL "
                             "ORDER BY worker").fetchall()
        assert all(sent > 0 for _, sent in stats), stats
        assert sum(sent for _, sent in stats) == finished(conn, names)[1]
        per_worker = conn.execute(
            "SELECT e.id %% 2, count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.name = ANY (%s) GROUP BY 1 ORDER BY 1", (names,)).fetchall()
        assert [sent for _, sent in stats] == [n for _, n in per_worker], (stats, per_worker)


def test_a_worker_that_dies_mid_run_loses_nothing(make_cluster, receiver):
    c = make_cluster({"postback.workers": "2"})
    receiver.script("/slow", {"delay": 0.05})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        c.wait_for(lambda: len(running_pids(conn)) == 2, what="two workers")
        names = [scoped_endpoint(conn, receiver.url("/slow?e={event}&t={transaction_id}&s={status}"), "dies",
                                 max_in_flight=2) for _ in range(4)]
        lifecycle(conn, names, 30)
        c.wait_for(lambda: finished(conn, names)[0] >= 20, timeout=30, what="a first few sent")
        victim = running_pids(conn)[1]
        os.kill(victim, signal.SIGKILL)
    # a killed backend restarts the whole cluster; the launcher starts both workers again
    time.sleep(2)
    with c.connect() as conn:
        c.wait_for(lambda: len(running_pids(conn)) == 2, timeout=30, what="two workers again")
        c.wait_for(lambda: all_done(conn, names), timeout=90, what="every delivery finished")
        states = conn.execute(
            "SELECT d.state, count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.name = ANY (%s) GROUP BY 1", (names,)).fetchall()
        assert states == [("succeeded", 4 * (30 * 2 + 15))], states
    # at-least-once: an interrupted request may come twice, but every conversion's statuses arrived in order
    order = collections.defaultdict(list)
    for r in receiver.seen("/slow"):
        q = r["query"]
        if not order[(q["e"], q["t"])] or order[(q["e"], q["t"])][-1] != q["s"]:
            order[(q["e"], q["t"])].append(q["s"])
    assert len(order) == 4 * 30
    for (_, t), statuses in order.items():
        assert statuses == ["pending", "approved"] + (["reversed"] if t[-1] in "13579" else []), (t, statuses)


def test_changing_the_number_of_workers_takes_effect_on_reload(make_cluster, receiver):
    c = make_cluster({"postback.workers": "1"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        c.wait_for(lambda: len(running_pids(conn)) == 1, what="one worker")
        names = [scoped_endpoint(conn, receiver.url("/r?e={event}&t={transaction_id}&s={status}"), "reload")
                 for _ in range(5)]
        lifecycle(conn, names, 10)
        reload(conn, workers=3)
        c.wait_for(lambda: len(running_pids(conn)) == 3, what="three workers")
        assert [(w[1], w[2]) for w in workers(conn)] == [(1, 3), (2, 3), (3, 3)]
        more = [scoped_endpoint(conn, receiver.url("/r?e={event}&t={transaction_id}&s={status}"), "reload")
                for _ in range(5)]
        lifecycle(conn, more, 10)
        reload(conn, workers=2)
        c.wait_for(lambda: len(running_pids(conn)) == 2 and len(workers(conn)) == 2, what="two workers")
        c.wait_for(lambda: all_done(conn, names + more), timeout=60, what="every delivery finished")
        check_sends(receiver, names + more, 10)
    assert "stopped worker 1/1 of database \"postgres\" (settings changed)" in c.log()


def test_two_databases_each_get_their_workers_and_reload_adds_and_removes(make_cluster, receiver):
    c = make_cluster({"postback.workers": "1"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        conn.execute("CREATE DATABASE shop_b")
        conn.execute("CREATE DATABASE shop_c")  # no extension there
        c.wait_for(lambda: len(running_pids(conn)) == 1, what="the first worker")
        first = running_pids(conn)[0]
        reload(conn, database_name="postgres, shop_b, shop_c")
        c.wait_for(lambda: len(workers(conn)) == 3 and all(w[4] for w in workers(conn)), what="three databases")
    with c.connect("shop_b") as b:
        b.execute("CREATE EXTENSION pg_postback")
        name_b = scoped_endpoint(b, receiver.url("/b?e={event}&t={transaction_id}&s={status}"), "shopb")
        lifecycle(b, [name_b], 10)
        c.wait_for(lambda: all_done(b, [name_b]), timeout=30, what="shop_b delivered")
        # the other databases' workers are listed from here too; shop_c says why it waits
        rows = workers(b)
        assert [r[0] for r in rows] == ["postgres", "shop_b", "shop_c"], rows
        assert "not installed" in rows[2][5], rows
        roles = b.execute("SELECT database, role FROM postback.worker_status() ORDER BY 1, 2").fetchall()
        assert roles == [(d, r) for d in ("postgres", "shop_b", "shop_c") for r in ("delivery", "maintenance")], roles
        # and the log says so once, not at every look
        assert c.log().count('of database "shop_c": pg_postback is not installed in this database') == 1
    with c.connect() as conn:
        name_a = scoped_endpoint(conn, receiver.url("/a?e={event}&t={transaction_id}&s={status}"), "shopa")
        lifecycle(conn, [name_a], 10)
        c.wait_for(lambda: all_done(conn, [name_a]), timeout=30, what="postgres delivered")
        check_sends(receiver, [name_a, name_b], 10)
        assert running_pids(conn) == [first], "adding databases restarted the first one's worker"
        # removing shop_b and adding a database that does not exist: the others run on
        reload(conn, database_name="postgres, shop_c, ghost")
        c.wait_for(lambda: [w[0] for w in workers(conn)] == ["ghost", "postgres", "shop_c"],
                   what=lambda: f"shop_b gone: {workers(conn)}")
        ghost = c.wait_for(lambda: [w for w in workers(conn) if w[0] == "ghost" and w[5]
                                    and "could not connect" in w[5]], what="ghost reported")
        assert ghost[0][4] is False
        assert running_pids(conn) == [first]
        time.sleep(4)
        # not retried in a tight loop: 1 s, 2 s, 4 s… between tries (of its two processes,
        # the delivery worker and the maintenance worker)
        tries = c.log().count('FATAL:  database "ghost" does not exist')
        assert 2 <= tries <= 8, tries
    with c.connect("shop_b") as b:
        hint = b.execute("SELECT hint FROM postback.worker_status() WHERE database = 'shop_b'").fetchone()[0]
        assert "not this database ('shop_b')" in hint and "Listed but no database: 'ghost'." in hint, hint
