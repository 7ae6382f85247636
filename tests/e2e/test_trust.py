"""Each defect of the trust issue, written as the attack, against a real preloaded cluster."""

import itertools
import json
import time

import psycopg
import pytest

from cluster import PG_BIN, as_postgres
from receiver import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
API_KEY = "Bearer api-key-7f3a9c"
counter = itertools.count()




def is_superuser(conn, role):
    return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def planted(schema, role):
    """Functions and operators that make `role` a superuser when the worker or a
    trigger resolves an unqualified name to them (exact-match lookalikes of what
    pg_catalog offers only through an implicit cast)."""
    escalate = f"ALTER ROLE {role} SUPERUSER"
    return f"""
        CREATE FUNCTION {schema}.mul(numeric, integer) RETURNS numeric LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN $1 OPERATOR(pg_catalog.*) $2::numeric; END $$;
        CREATE OPERATOR {schema}.* (LEFTARG = numeric, RIGHTARG = integer, FUNCTION = {schema}.mul);
        CREATE FUNCTION {schema}.div(bigint, numeric) RETURNS numeric LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN $1::numeric OPERATOR(pg_catalog./) $2; END $$;
        CREATE OPERATOR {schema}./ (LEFTARG = bigint, RIGHTARG = numeric, FUNCTION = {schema}.div);
        CREATE FUNCTION {schema}.imul(bigint, interval) RETURNS interval LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN $1::float8 OPERATOR(pg_catalog.*) $2; END $$;
        CREATE OPERATOR {schema}.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = {schema}.imul);
        CREATE FUNCTION {schema}.cat(bigint, text) RETURNS text LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN $1::text OPERATOR(pg_catalog.||) $2; END $$;
        CREATE OPERATOR {schema}.|| (LEFTARG = bigint, RIGHTARG = text, FUNCTION = {schema}.cat);
        CREATE FUNCTION {schema}.to_timestamp(numeric) RETURNS timestamptz LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN pg_catalog.to_timestamp($1::float8); END $$;
        CREATE FUNCTION {schema}.unnest(bigint[]) RETURNS SETOF bigint LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
        CREATE FUNCTION {schema}.upper(text) RETURNS text LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN pg_catalog.upper($1); END $$;
        CREATE FUNCTION {schema}.now() RETURNS timestamptz LANGUAGE plpgsql AS
            $$ BEGIN EXECUTE '{escalate}'; RETURN pg_catalog.now(); END $$;
    """


def test_objects_planted_on_the_search_path_never_run_as_the_worker_or_a_trigger(cluster, receiver):
    """The ways in: CREATE on `public` (its owner, or PUBLIC as pg_upgrade'd databases
    keep it) and CREATE on the database (a schema named after the superuser, "$user")."""
    with cluster.connect() as conn:
        for role in ("squat_owner", "squat_dbcreate"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("GRANT CREATE ON DATABASE postgres TO squat_dbcreate")
        conn.execute("GRANT CREATE ON SCHEMA public TO squat_owner")
        conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        try:
            with psycopg.connect(cluster.dsn().replace("user=postgres", "user=squat_owner"), autocommit=True) as m:
                m.execute(planted("public", "squat_owner"))
            with psycopg.connect(cluster.dsn().replace("user=postgres", "user=squat_dbcreate"), autocommit=True) as m:
                m.execute("CREATE SCHEMA postgres")  # "$user" of the worker and of the superuser
                m.execute(planted("postgres", "squat_dbcreate"))
                m.execute("GRANT USAGE ON SCHEMA postgres TO PUBLIC")
            receiver.script("/flaky", {"status": 500}, {"status": 200})
            name = f"sp{next(counter)}"
            conn.execute("INSERT INTO postback.endpoints (name, url_template, retry_schedule, statuses) "
                         "VALUES (%s, %s, '{100 ms}', '{pending,approved}')",
                         (name, receiver.url("/flaky?c={click_id}&s={status}")))
            # the superuser inserts and updates with the default search_path ("$user", public)
            tx = f"sp-{next(counter)}"
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, status, amount) "
                         "VALUES ('c', %s, 'pending', 9.5)", (tx,))
            conn.execute("UPDATE postback.conversions SET status = 'approved' WHERE transaction_id = %s", (tx,))
            cluster.wait_for(lambda: conn.execute(
                "SELECT count(*) = 2 FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
                "WHERE e.name = %s AND d.state = 'succeeded'", (name,)).fetchone()[0],
                what="both deliveries (one retried) to succeed")
            conn.execute("SELECT * FROM postback.preview(%s, (SELECT id FROM postback.conversions "
                         "WHERE transaction_id = %s))", (name, tx))
            conn.execute("SELECT * FROM postback.worker_status()")
            time.sleep(0.3)
            for role in ("squat_owner", "squat_dbcreate"):
                assert not is_superuser(conn, role), f"{role} became superuser"
            # the lookalikes are real: called unqualified by their planter's path they do fire
            conn.execute("SET search_path = postgres, pg_catalog")
            conn.execute("SELECT 2::numeric * 3")
            assert is_superuser(conn, "squat_dbcreate"), "the planted operator should have fired when resolved"
        finally:
            conn.execute("RESET search_path")
            conn.execute("DROP SCHEMA IF EXISTS postgres CASCADE")
            for f in ("mul(numeric, integer)", "div(bigint, numeric)", "imul(bigint, interval)",
                      "cat(bigint, text)", "to_timestamp(numeric)", "unnest(bigint[])", "upper(text)", "now()"):
                conn.execute(f"DROP FUNCTION IF EXISTS public.{f} CASCADE")
            conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            conn.execute("REVOKE CREATE ON SCHEMA public FROM squat_owner")
            conn.execute("REVOKE CREATE ON DATABASE postgres FROM squat_dbcreate")
            for role in ("squat_owner", "squat_dbcreate"):
                conn.execute(f"DROP OWNED BY {role}")
                conn.execute(f"DROP ROLE {role}")


def test_a_squatted_schema_is_refused(make_cluster):
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE ROLE squatter LOGIN")
        conn.execute("GRANT CREATE ON DATABASE postgres TO squatter")
        with psycopg.connect(c.dsn().replace("user=postgres", "user=squatter"), autocommit=True) as m:
            m.execute("CREATE SCHEMA postback")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("CREATE EXTENSION pg_postback")
        assert 'owned by role "squatter"' in str(err.value)
        conn.execute("DROP SCHEMA postback")
        # owned by the superuser, but someone else may create objects in it
        conn.execute("CREATE SCHEMA postback")
        conn.execute("GRANT CREATE ON SCHEMA postback TO squatter")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("CREATE EXTENSION pg_postback")
        assert "grants CREATE to squatter" in str(err.value)
        conn.execute("REVOKE CREATE ON SCHEMA postback FROM squatter")
        conn.execute("CREATE EXTENSION pg_postback")


def connect_as(cluster, role):
    return psycopg.connect(cluster.dsn().replace("user=postgres", f"user={role}"), autocommit=True)


def test_roles_work_and_give_no_signing_oracle(cluster, receiver):
    with cluster.connect() as conn:
        for role in ("app_writer", "bi_reader"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("SELECT postback.grant_operator('app_writer')")
        conn.execute("SELECT postback.grant_analyst('bi_reader')")
        hook = f"hook{next(counter)}"
        conn.execute("INSERT INTO postback.endpoints (name, kind, url_template, signing_scheme, headers) "
                     "VALUES (%s, 'webhook', %s, 'standard-webhooks', %s)",
                     (hook, receiver.url("/signed"), json.dumps({"Authorization": API_KEY})))
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) "
                     "SELECT id, %s FROM postback.endpoints WHERE name = %s", (SECRET, hook))
        endpoint_id = conn.execute("SELECT id FROM postback.endpoints WHERE name = %s", (hook,)).fetchone()[0]
    try:
        with connect_as(cluster, "app_writer") as app:
            # the README's grants are enough: the enqueue runs as the owner
            tx = f"role-{next(counter)}"
            app.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', %s)", (tx,))
            app.execute("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id = %s", (tx,))
            conv_id = app.execute("SELECT id FROM postback.conversions WHERE transaction_id = %s", (tx,)).fetchone()[0]
            # ... and nothing more: no forged delivery, endpoint or secret
            for sql in [
                f"INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, body) "
                f"VALUES ({endpoint_id}, {conv_id}, 'x', 'approved', 'forged', 'POST', 'http://127.0.0.1:1/', '{{}}')",
                f"UPDATE postback.deliveries SET body = '{{\"forged\": true}}' WHERE endpoint_id = {endpoint_id}",
                "INSERT INTO postback.endpoints (name, url_template) VALUES ('mine', 'https://evil.test/')",
                f"UPDATE postback.endpoints SET url_template = 'https://evil.test/' WHERE id = {endpoint_id}",
                "SELECT secret FROM postback.endpoint_secrets",
                "SELECT headers FROM postback.endpoints",
                f"SELECT * FROM postback.sign_request({endpoint_id}, 'webhook', 'standard-webhooks', NULL, 'ts', "
                f"'sig', 'http://127.0.0.1:1/', NULL, NULL, '{{\"forged\": 1}}', 'k')",
                "SELECT postback.grant_operator('bi_reader')",
                "DELETE FROM postback.attempts",
            ]:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    app.execute(sql)
            # an operator previews, with credentials redacted
            (headers,) = app.execute("SELECT headers FROM postback.preview(%s, %s)", (hook, conv_id)).fetchone()
            assert headers["Authorization"] == "[redacted]" and headers["webhook-signature"].startswith("v1,")
        with cluster.connect() as conn:
            cluster.wait_for(lambda: conn.execute(
                "SELECT count(*) = 2 FROM postback.deliveries WHERE endpoint_id = %s AND state = 'succeeded'",
                (endpoint_id,)).fetchone()[0], what="the operator's conversion to be delivered")
        seen = receiver.seen("/signed")
        assert len(seen) == 2 and {s["headers"]["authorization"] for s in seen} == {API_KEY}
        with connect_as(cluster, "bi_reader") as bi:
            for sql in ["INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'bi')",
                        "SELECT * FROM postback.preview('x', 1)",
                        "SELECT * FROM postback.endpoint_secrets"]:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    bi.execute(sql)
            assert bi.execute("SELECT running FROM postback.worker_status()").fetchone()[0] is True
    finally:
        with cluster.connect() as conn:
            for role in ("app_writer", "bi_reader"):
                conn.execute(f"SELECT postback.revoke_access('{role}')")
                conn.execute(f"DROP ROLE {role}")


def test_an_analyst_reads_no_secret_anywhere(cluster, receiver):
    """Every row of every relation an analyst may read, as JSON, holds no credential."""
    secrets = [SECRET, API_KEY, "sig="]
    with cluster.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS probe")
        conn.execute("CREATE ROLE probe LOGIN")
        conn.execute("SELECT postback.grant_analyst('probe')")
        signed = f"signed{next(counter)}"
        # a signed postback to a closed port: transport errors used to quote the signed URL
        conn.execute("INSERT INTO postback.endpoints (name, url_template, signing_scheme, headers, retry_schedule) "
                     "VALUES (%s, 'http://127.0.0.1:9/pb?c={click_id}', 'hmac-sha256-hex', %s, '{50 ms}')",
                     (signed, json.dumps({"X-Api-Key": API_KEY})))
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) "
                     "SELECT id, %s FROM postback.endpoints WHERE name = %s", (SECRET, signed))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', %s)",
                     (f"probe-{next(counter)}",))
        cluster.wait_for(lambda: conn.execute(
            "SELECT count(*) > 0 FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id "
            "JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = %s AND a.error IS NOT NULL",
            (signed,)).fetchone()[0], what="a failed signed attempt")
    try:
        with connect_as(cluster, "probe") as bi:
            readable = bi.execute(
                "SELECT c.oid::regclass::text, has_table_privilege(c.oid, 'SELECT') FROM pg_class c "
                "WHERE c.relnamespace = 'postback'::regnamespace AND c.relkind IN ('r', 'v') "
                "AND has_any_column_privilege(c.oid, 'SELECT')").fetchall()
            names = {r[0] for r in readable}
            assert {"postback.conversions", "postback.deliveries", "postback.attempts",
                    "postback.endpoints", "postback.delivery_summary"} <= names
            assert "postback.endpoint_secrets" not in names
            rows = 0
            for rel, whole in readable:
                if whole:
                    dump = bi.execute(f"SELECT row_to_json(t)::text FROM {rel} t").fetchall()
                else:
                    cols = [r[0] for r in bi.execute(
                        "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                        "AND NOT attisdropped AND has_column_privilege(attrelid, attnum, 'SELECT')", (rel,))]
                    assert "headers" not in cols
                    dump = bi.execute(f"SELECT row_to_json(t)::text FROM (SELECT {', '.join(cols)} FROM {rel}) t"
                                      ).fetchall()
                for (text,) in dump:
                    rows += 1
                    for s in secrets:
                        assert s not in text, f"{s!r} readable in {rel}: {text}"
            assert rows > 0
            (status,) = bi.execute("SELECT last_error FROM postback.worker_status()").fetchone()
            for s in secrets:
                assert s not in (status or "")
    finally:
        with cluster.connect() as conn:
            conn.execute("UPDATE postback.endpoints SET active = false WHERE name LIKE 'signed%'")
            conn.execute("SELECT postback.revoke_access('probe')")
            conn.execute("DROP ROLE probe")


def test_forged_rows_written_behind_the_checks_are_never_sent(cluster, receiver):
    """Even the owner, bypassing triggers, cannot make the worker send elsewhere or inject headers."""
    other = Receiver().start()
    try:
        with cluster.connect() as conn:
            bad = f"bad{next(counter)}"
            conn.execute("INSERT INTO postback.endpoints (name, url_template, headers, events) "
                         "VALUES (%s, %s, %s, '{nothing}')",
                         (bad, receiver.url("/ok?c={click_id}"), json.dumps({"Authorization": API_KEY})))
            conn.execute("ALTER TABLE postback.endpoints DISABLE TRIGGER endpoints_fill_defaults")
            try:
                # a header with CR/LF and a template whose host a value can move
                moved = f"moved{next(counter)}"
                conn.execute("INSERT INTO postback.endpoints (name, url_template, method, max_attempts, headers, events) "
                             "VALUES (%s, %s, 'GET', 3, %s, '{forge}')",
                             (moved, "http:///{click_id}:%s/pb" % other.url("/").split(":")[2].rstrip("/"),
                              json.dumps({"Authorization": API_KEY})))
                crlf = f"crlf{next(counter)}"
                conn.execute("INSERT INTO postback.endpoints (name, url_template, method, max_attempts, headers, events) "
                             "VALUES (%s, %s, 'GET', 3, %s, '{forge}')",
                             (crlf, receiver.url("/crlf"), json.dumps({"X-Key": "v\r\nX-Injected: 1"})))
            finally:
                conn.execute("ALTER TABLE postback.endpoints ENABLE TRIGGER endpoints_fill_defaults")
            tx = f"forge-{next(counter)}"
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES (%s, %s, 'forge')",
                         ("127.0.0.1", tx))
            # a delivery row of the owner's making, pointing elsewhere than its endpoint
            conn.execute("INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, "
                         "method, url) SELECT e.id, c.id, 'forge', 'approved', 'forged-' || c.id, 'GET', %s "
                         "FROM postback.endpoints e, postback.conversions c WHERE e.name = %s AND c.transaction_id = %s",
                         (other.url("/stolen"), bad, tx))

            def states():
                return dict(conn.execute(
                    "SELECT e.name, d.state || ': ' || coalesce(d.last_error, '') FROM postback.deliveries d "
                    "JOIN postback.endpoints e ON e.id = d.endpoint_id "
                    "JOIN postback.conversions c ON c.id = d.conversion_id WHERE c.transaction_id = %s "
                    "AND e.name IN (%s, %s, %s)", (tx, bad, moved, crlf)).fetchall())
            try:
                cluster.wait_for(lambda: all(s.startswith("dead") for s in states().values()) and len(states()) == 3,
                                 what="the forged deliveries to be dead")
            except AssertionError as e:
                raise AssertionError(f"{e}: {states()}")
            result = states()
            assert "not to its endpoint's" in result[bad], result
            assert "no longer valid" in result[moved], result
            assert "control character" in result[crlf], result
            attempts = conn.execute(
                "SELECT count(*) FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id "
                "JOIN postback.endpoints e ON e.id = d.endpoint_id "
                "JOIN postback.conversions c ON c.id = d.conversion_id WHERE c.transaction_id = %s "
                "AND e.name IN (%s, %s, %s)", (tx, bad, moved, crlf)).fetchone()[0]
            assert attempts == 3  # each dead at its first attempt, not retried as transient
            conn.execute("UPDATE postback.endpoints SET active = false WHERE name IN (%s, %s, %s)", (bad, moved, crlf))
        time.sleep(0.2)
        assert other.seen() == []
        assert receiver.seen("/crlf") == []
    finally:
        other.stop()


def test_pg_dump_and_restore_keep_data_and_sequences(make_cluster, receiver):
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', %s)",
                     (receiver.url("/pb?c={click_id}"),))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                     "SELECT 'c' || g, 'd-' || g FROM generate_series(1, 25) g")
        c.wait_for(lambda: conn.execute(
            "SELECT count(*) = 25 FROM postback.deliveries WHERE state = 'succeeded'").fetchone()[0],
            what="25 deliveries")
        # one delivery still pending in the dump: its receiver failed and the retry is an hour away
        receiver.script("/later", {"status": 500})
        conn.execute("INSERT INTO postback.endpoints (name, url_template, events, retry_schedule) "
                     "VALUES ('later', %s, '{later}', '{1 hour}')", (receiver.url("/later?c={click_id}"),))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c26', 'd-26', 'later')")
        c.wait_for(lambda: conn.execute(
            "SELECT count(*) = 27 FROM postback.attempts").fetchone()[0], what="27 attempts")
        before = conn.execute(
            "SELECT (SELECT count(*) FROM postback.conversions), (SELECT count(*) FROM postback.deliveries), "
            "(SELECT count(*) FROM postback.attempts), (SELECT count(*) FROM postback.endpoints)").fetchone()
        conn.execute("CREATE DATABASE restored")
    dump = f"{c.datadir}/dump.pgc"
    as_postgres([f"{PG_BIN}/pg_dump", "-h", "127.0.0.1", "-p", str(c.port), "-U", "postgres", "-Fc",
                 "-f", dump, "postgres"])
    as_postgres([f"{PG_BIN}/pg_restore", "-h", "127.0.0.1", "-p", str(c.port), "-U", "postgres",
                 "--exit-on-error", "-d", "restored", dump])
    with c.connect("restored") as conn:
        after = conn.execute(
            "SELECT (SELECT count(*) FROM postback.conversions), (SELECT count(*) FROM postback.deliveries), "
            "(SELECT count(*) FROM postback.attempts), (SELECT count(*) FROM postback.endpoints)").fetchone()
        assert after == before == (26, 27, 27, 2)
        assert conn.execute("SELECT count(*) FROM postback.deliveries WHERE state = 'pending'").fetchone()[0] == 1
        # the sequences came along: new rows do not collide with restored ones
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c27', 'd-27')")
        assert conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0] == 28
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('third', 'https://n.test/x')")
