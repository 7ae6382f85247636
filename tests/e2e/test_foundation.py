"""The extension installs into a preloaded cluster and its worker behaves like a good citizen."""

import subprocess
import time

import psycopg
import pytest

from cluster import PG_BIN


def worker_rows(conn):
    return conn.execute(
        "SELECT pid, application_name, datname FROM pg_stat_activity "
        "WHERE backend_type = 'pg_postback worker'").fetchall()


def test_worker_is_visible_in_pg_stat_activity(cluster):
    with cluster.connect() as conn:
        rows = cluster.wait_for(lambda: worker_rows(conn), what="the worker in pg_stat_activity")
        assert len(rows) == 1
        pid, appname, datname = rows[0]
        assert appname == "pg_postback worker"
        assert datname == "postgres"
        running, status_pid, hint = conn.execute(
            "SELECT running, pid, hint FROM postback.worker_status()").fetchone()
        assert running is True and status_pid == pid and hint is None
        # beside it, the database's maintenance worker (roll-up, purge) and the launcher
        others = cluster.wait_for(lambda: conn.execute(
            "SELECT backend_type, application_name, coalesce(datname, '') FROM pg_stat_activity "
            "WHERE backend_type IN ('pg_postback maintenance', 'pg_postback launcher') ORDER BY 1").fetchall()
            if len(conn.execute("SELECT 1 FROM pg_stat_activity WHERE backend_type IN "
                                "('pg_postback maintenance', 'pg_postback launcher')").fetchall()) == 2 else None,
            what="the launcher and the maintenance worker")
        assert others == [("pg_postback launcher", "", ""),
                          ("pg_postback maintenance", "pg_postback maintenance", "postgres")], others


def test_gucs_are_registered_with_descriptions(cluster):
    with cluster.connect() as conn:
        rows = dict(conn.execute(
            "SELECT name, short_desc FROM pg_settings WHERE name LIKE 'postback.%'").fetchall())
    assert set(rows) >= {"postback.database_name", "postback.poll_interval", "postback.batch_size",
                         "postback.concurrency", "postback.max_response_bytes",
                         "postback.allowed_targets", "postback.max_url_bytes", "postback.max_body_bytes",
                         "postback.retention", "postback.breaker_failures", "postback.breaker_cooldown",
                         "postback.disable_after", "postback.allow_distributed_update"}
    assert all(desc for desc in rows.values())


def test_malformed_allowed_targets_is_refused_when_set(cluster):
    with cluster.connect() as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            conn.execute("ALTER SYSTEM SET postback.allowed_targets = '127.0.0.1/33'")
        assert "invalid prefix length" in str(err.value.diag.message_detail)
        conn.execute("ALTER SYSTEM SET postback.allowed_targets = '127.0.0.1/32, ::1/128'")
        conn.execute("ALTER SYSTEM RESET postback.allowed_targets")


def test_worker_exits_promptly_on_fast_shutdown(make_cluster):
    c = make_cluster()
    with c.connect() as conn:
        c.wait_for(lambda: worker_rows(conn), what="the worker to start")
    started = time.monotonic()
    c.stop("fast", timeout=20)
    assert time.monotonic() - started < 10
    assert "pg_postback worker shutting down" in c.log()
    assert "terminated by signal" not in c.log()


def test_extension_installs_without_preloading(make_cluster):
    c = make_cluster(settings={"shared_preload_libraries": "''"})
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        running, hint = conn.execute("SELECT running, hint FROM postback.worker_status()").fetchone()
    assert running is False
    assert "shared_preload_libraries" in hint


def test_dump_and_restore_keep_endpoints_and_secrets(cluster, tmp_path):
    dump = tmp_path / "config.dump"
    with cluster.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS dump_src")
        conn.execute("DROP DATABASE IF EXISTS dump_dst")
        conn.execute("CREATE DATABASE dump_src")
        conn.execute("CREATE DATABASE dump_dst")
    with cluster.connect("dump_src") as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        endpoint_id = conn.execute(
            "INSERT INTO postback.endpoints (name, kind, url_template, signing_scheme) "
            "VALUES ('acme', 'webhook', 'https://acme.example/hook', 'github') RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO postback.endpoint_secrets (endpoint_id, secret) VALUES (%s, 's3cret')",
                     (endpoint_id,))
    client = dict(check=True, capture_output=True, text=True)
    subprocess.run([f"{PG_BIN}/pg_dump", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
                 "-Fc", "-f", str(dump), "dump_src"], **client)
    subprocess.run([f"{PG_BIN}/pg_restore", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
                 "--exit-on-error", "-d", "dump_dst", str(dump)], **client)
    with cluster.connect("dump_dst") as conn:
        rows = conn.execute(
            "SELECT e.name, e.kind, e.signing_scheme, s.secret FROM postback.endpoints e "
            "JOIN postback.endpoint_secrets s ON s.endpoint_id = e.id").fetchall()
        assert rows == [("acme", "webhook", "github", "s3cret")]
        # the identity sequences came along too: a new endpoint does not collide
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('next', 'https://n.example/')")
