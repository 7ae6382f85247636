"""0.1.0 → 0.2.0 → 0.3.0 and 0.2.0 → 0.3.0: an upgraded database equals a fresh one, its
data and pending deliveries survive, and grants the new model no longer gives are revoked.

The frozen install scripts of 0.1.0 and 0.2.0 (sql/releases/) are installed beside the
current one, so a cluster running the new library can still CREATE EXTENSION pg_postback
VERSION '0.1.0' or '0.2.0'.
"""

import hashlib
import json
import threading
import time

import psycopg
import pytest

from receiver import Receiver

# Every object of the extension, described so that two databases can be compared.
CATALOG = {
    "members": """
        SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
          FROM pg_depend d JOIN pg_extension x ON x.oid = d.refobjid
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND x.extname = 'pg_postback'""",
    "columns": """
        SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               a.attidentity, pg_get_expr(ad.adbin, ad.adrelid), a.attcollation::regcollation::text,
               col_description(c.oid, a.attnum),
               row_number() OVER (PARTITION BY c.relname ORDER BY a.attnum)
          FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
          LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
         WHERE c.relnamespace = 'postback'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped""",
    "relations": """
        SELECT c.relname, c.relkind, obj_description(c.oid, 'pg_class'), c.relacl::text,
               CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END
          FROM pg_class c WHERE c.relnamespace = 'postback'::regnamespace""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'postback'::regnamespace""",
    "indexes": """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
         WHERE c.relnamespace = 'postback'::regnamespace""",
    "triggers": """
        SELECT tgname, pg_get_triggerdef(t.oid), tgenabled
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'postback'::regnamespace AND NOT tgisinternal""",
    "functions": """
        SELECT p.oid::regprocedure::text, l.lanname, p.prosrc, p.probin, p.prosecdef, p.proconfig,
               p.provolatile, p.proisstrict, p.proparallel, pg_get_function_result(p.oid),
               pg_get_function_arguments(p.oid), p.proacl::text, obj_description(p.oid, 'pg_proc')
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'postback'::regnamespace""",
    "config_dump": """
        SELECT t.oid::regclass::text, c.cond
          FROM pg_extension x, unnest(x.extconfig, x.extcondition) AS t(oid, cond)
          JOIN pg_class c2 ON c2.oid = t.oid, LATERAL (SELECT t.cond) c
         WHERE x.extname = 'pg_postback'""",
    "schema": """
        SELECT nspname, nspacl::text, obj_description(oid, 'pg_namespace')
          FROM pg_namespace WHERE nspname = 'postback'""",
}


def catalog(conn):
    return {name: sorted(map(repr, conn.execute(sql).fetchall())) for name, sql in CATALOG.items()}


CURRENT = "0.3.0"


@pytest.mark.parametrize("start", ["0.1.0", "0.2.0"])
def test_upgraded_database_equals_a_fresh_install(make_cluster, start):
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE DATABASE fresh")
        conn.execute("CREATE DATABASE upgraded")
    with c.connect("fresh") as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_postback'").fetchone()[0] == CURRENT
        fresh = catalog(conn)
    with c.connect("upgraded") as conn:
        conn.execute(f"CREATE EXTENSION pg_postback VERSION '{start}'")
        old = catalog(conn)
        # 0.1.0 goes through 0.2.0: ALTER EXTENSION runs the chain of upgrade scripts
        conn.execute("ALTER EXTENSION pg_postback UPDATE")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_postback'").fetchone()[0] == CURRENT
        upgraded = catalog(conn)
    assert old != fresh  # the comparison can tell versions apart
    for part in CATALOG:
        only_fresh = sorted(set(fresh[part]) - set(upgraded[part]))
        only_upgraded = sorted(set(upgraded[part]) - set(fresh[part]))
        assert not only_fresh and not only_upgraded, (
            f"{part} differ:\n  only in a fresh install: {only_fresh}\n  only after the upgrade: {only_upgraded}")


def test_data_and_pending_deliveries_survive_the_update_and_are_delivered(make_cluster):
    c = make_cluster()
    r = Receiver().start()
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback VERSION '0.1.0'")
            # 0.1.0 copied endpoint headers into every delivery; 0.2.0 adds them at send time
            conn.execute(
                "INSERT INTO postback.endpoints (name, url_template, headers) VALUES (%s, %s, %s)",
                ("net", r.url("/pb?cid={click_id}&tx={transaction_id}"), '{"Authorization": "Bearer k-1"}'))
            conn.execute(
                "INSERT INTO postback.endpoints (name, kind, url_template, signing_scheme) "
                "VALUES ('hook', 'webhook', %s, 'github')", (r.url("/hook"),))
            conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) "
                         "SELECT id, 's3cret' FROM postback.endpoints WHERE name = 'hook'")
            conn.execute(
                "INSERT INTO postback.conversions (click_id, transaction_id, amount, currency) "
                "SELECT 'c' || g, 'up-' || g, g, 'EUR' FROM generate_series(1, 50) g")
            # the new library's worker does not touch a schema it does not speak
            time.sleep(1.5)
            assert r.seen() == []
            assert f"extension is at version 0.1.0 but the library is {CURRENT}" in c.log()
            # and worker_status says so, whatever the schema's version
            last_error = conn.execute("SELECT last_error FROM postback.worker_status()").fetchone()[0]
            assert "ALTER EXTENSION pg_postback UPDATE" in last_error, last_error
            before = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE state = 'pending') FROM postback.deliveries").fetchone()
            assert before == (100, 100)
            conn.execute("ALTER EXTENSION pg_postback UPDATE")
            c.wait_for(lambda: conn.execute(
                "SELECT count(*) = 100 FROM postback.deliveries WHERE state = 'succeeded'").fetchone()[0],
                what="the 0.1.0 deliveries to be delivered after the update")
            assert conn.execute("SELECT count(*) FROM postback.conversions").fetchone()[0] == 50
            assert conn.execute("SELECT count(*) FROM postback.attempts").fetchone()[0] == 100
            # and new conversions flow through the new triggers
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('n', 'after')")
            c.wait_for(lambda: len(r.seen("/pb")) == 51 and len(r.seen("/hook")) == 51,
                       what="a conversion inserted after the update")
        gets = r.seen("/pb")
        assert {g["headers"].get("authorization") for g in gets} == {"Bearer k-1"}
        assert sorted(g["query"]["tx"] for g in gets) == sorted([f"up-{i}" for i in range(1, 51)] + ["after"])
        assert len(r.seen("/hook")) == 51
        assert all(h["headers"]["x-hub-signature-256"].startswith("sha256=") for h in r.seen("/hook"))
    finally:
        r.stop()


def test_the_update_revokes_what_0_1_0_needed_and_reapplies_the_roles(make_cluster, receiver):
    """A working 0.1.0 deployment: the application inserted conversions (and, as 0.1.0's
    enqueue ran as the caller, deliveries, reading endpoints); analysts read the tables."""
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback VERSION '0.1.0'")
        conn.execute("INSERT INTO postback.endpoints (name, url_template, headers) VALUES (%s, %s, %s)",
                     ("net", receiver.url("/pb?c={click_id}"), '{"Authorization": "Bearer partner-key"}'))
        for role in ("app", "analyst"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("""
            GRANT USAGE ON SCHEMA postback TO app;
            GRANT INSERT, UPDATE (status, amount, currency, attributes) ON postback.conversions TO app;
            GRANT INSERT ON postback.deliveries TO app;
            GRANT USAGE ON ALL SEQUENCES IN SCHEMA postback TO app;
            GRANT SELECT ON postback.endpoints TO app;
            GRANT USAGE ON SCHEMA postback TO analyst;
            GRANT SELECT ON postback.conversions, postback.deliveries, postback.attempts,
                            postback.endpoints, postback.delivery_summary TO analyst;""")
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("ALTER EXTENSION pg_postback UPDATE")
        text = "\n".join(notices)
        assert 'role app lost' in text and "INSERT on postback.deliveries" in text and "SELECT on postback.endpoints" in text, text
        assert "grant_operator" in text and 'role analyst lost SELECT on postback.endpoints' in text, text
    dsn = c.dsn()
    with psycopg.connect(dsn, user="analyst", autocommit=True) as analyst:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            analyst.execute("SELECT headers FROM postback.endpoints")
        assert analyst.execute("SELECT name FROM postback.endpoints").fetchone()[0] == "net"
        assert analyst.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0] == 0
        # and what 0.3.0's views and functions call on its behalf
        assert analyst.execute("SELECT endpoint, breaker FROM postback.endpoint_health").fetchone() == ("net", "closed")
        assert analyst.execute("SELECT count(*) FROM postback.cluster_worker_status()").fetchone()[0] >= 1
    with psycopg.connect(dsn, user="app", autocommit=True) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("INSERT INTO postback.deliveries (endpoint_id, event, status, idempotency_key, method, url) "
                        "SELECT id, 'x', 'x', 'forged', 'PUT', %s FROM postback.endpoints", (receiver.url("/any"),))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT headers FROM postback.endpoints")
        # what the application does keeps working, through the enqueue trigger
        app.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c1', 'app-1')")
    c.wait_for(lambda: len(receiver.seen("/pb")) == 1, what="the application's conversion to be delivered")
    assert receiver.seen("/any") == []


def test_unsent_0_2_0_hash_markers_move_out_of_band_and_forged_ones_are_held(make_cluster, receiver):
    secret = "s" * 80
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback VERSION '0.2.0'")
        conn.execute("INSERT INTO postback.endpoints (name, url_template, paused_at) VALUES ('h', %s, now())",
                     (receiver.url("/h?tx={transaction_id}&v={hash:md5:transaction_id,':',secret}"),))
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) SELECT id, %s FROM postback.endpoints",
                     (secret,))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'plain'), "
                     "('c', '~pgpb-hash~sha256~W251bGxd~')")
        conn.execute("ALTER EXTENSION pg_postback UPDATE")
        rows = dict(conn.execute("SELECT c.transaction_id, d.state FROM postback.deliveries d "
                                 "JOIN postback.conversions c ON c.id = d.conversion_id").fetchall())
        assert rows == {"plain": "pending", "~pgpb-hash~sha256~W251bGxd~": "dead"}, rows
        conn.execute("SELECT postback.resume('h')")
        c.wait_for(lambda: len(receiver.seen("/h")) == 1, what="the moved delivery")
    (got,) = receiver.seen("/h")
    assert got["query"] == {"tx": "plain", "v": hashlib.md5(f"plain:{secret}".encode()).hexdigest()}, got["query"]


def test_the_update_beside_a_writer_makes_it_wait_and_never_fail(make_cluster, receiver):
    """An application keeps inserting conversions (whose trigger writes deliveries) while
    the update runs: before the update took its locks in the writers' order, one of those
    inserts failed with "deadlock detected" (200k deliveries, bench/upgrade.py)."""
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback VERSION '0.2.0'")
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', %s)",
                     (receiver.url("/pb?tx={transaction_id}"),))
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, "
            "  url, state, attempts, completed_at) "
            "SELECT (SELECT id FROM postback.endpoints), NULL, 'old', 'approved', 'old.' || g, 'GET', "
            "       'http://127.0.0.1:9/old', 'succeeded', 1, now() FROM generate_series(1, 100000) g")
        conn.execute("SET session_replication_role = origin")
    errors, done, stop = [], [], threading.Event()

    def write(name):
        with c.connect() as w:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    w.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('k', %s)",
                              (f"{name}-{n}",))
                    done.append(time.monotonic())
                except psycopg.Error as e:
                    errors.append(str(e).splitlines()[0])

    writers = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(2)]
    for t in writers:
        t.start()
    try:
        time.sleep(0.5)
        with c.connect() as conn:
            started = time.monotonic()
            conn.execute("ALTER EXTENSION pg_postback UPDATE")
            ended = time.monotonic()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in writers:
            t.join()
    assert errors == []
    assert any(t < started for t in done) and any(t > ended for t in done)
    with c.connect() as conn:
        n = conn.execute("SELECT count(*) FROM postback.conversions").fetchone()[0]
        assert n == len(done)
        c.wait_for(lambda: len(receiver.seen("/pb")) == n, timeout=60,
                   what="every conversion written beside the update to be delivered")
