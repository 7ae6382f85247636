"""postback.watch: postbacks from a table the application already has (orders), against a real cluster."""

import itertools
import json

import psycopg
import pytest

from cluster import PG_BIN, as_postgres

counter = itertools.count()


def orders_table(conn, owner=None, primary_key=True):
    """A shop's orders table (as a shop has it), watched by nothing yet; returns its name."""
    name = f"orders{next(counter)}"
    conn.execute(f"""CREATE TABLE public.{name} (
        id         bigint GENERATED ALWAYS AS IDENTITY {'PRIMARY KEY' if primary_key else ''},
        click      text,
        total      numeric(12, 2) NOT NULL,
        cur        text NOT NULL DEFAULT 'EUR',
        state      text NOT NULL DEFAULT 'new',
        email      text,
        created_at timestamptz NOT NULL DEFAULT now())""")
    if owner:
        conn.execute(f"ALTER TABLE public.{name} OWNER TO {owner}")
    return name


def mapping(table, **extra):
    m = {
        "click_id": "click",
        "transaction_id": f"'{table}-' || id",
        "event": f"'{table}'",
        "amount": "total",
        "currency": "cur",
        "status": "CASE state WHEN 'paid' THEN 'approved' WHEN 'refunded' THEN 'refunded' ELSE 'pending' END",
        "occurred_at": "created_at",
        "when": "click IS NOT NULL",
        "exclude": ["email"],
    }
    m.update(extra)
    return json.dumps(m)


def endpoint(conn, receiver, table):
    conn.execute("INSERT INTO postback.endpoints (name, url_template, events) VALUES (%s, %s, %s)",
                 (table, receiver.url(f"/{table}?c={{click_id}}&tx={{transaction_id}}&s={{status}}&a={{amount}}"),
                  [table]))


def sent(receiver, table):
    return [(s["query"]["tx"], s["query"]["s"], s["query"]["a"]) for s in receiver.seen(f"/{table}")]


def test_inserted_rows_become_conversions_and_postbacks_in_the_same_transaction(cluster, receiver):
    with cluster.connect() as conn:
        t = orders_table(conn)
        endpoint(conn, receiver, t)
        fn = conn.execute("SELECT postback.watch(%s, %s)::text", (t, mapping(t))).fetchone()[0]
        assert fn == f"{t}_postback_watch()"
        # one statement, three rows: an organic order (no click) is left out by "when"
        conn.execute(f"INSERT INTO {t} (click, total, email) VALUES ('k1', 10, 'a@shop.test'), "
                     "(NULL, 5, 'b@shop.test'), ('k2', 7.5, NULL)")
        with conn.cursor().copy(f"COPY {t} (click, total) FROM STDIN") as copy:
            copy.write_row(("k3", "99.90"))
        # a rolled-back order fires nothing
        with pytest.raises(psycopg.errors.RaiseException):
            with conn.transaction():
                conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k-rollback', 1)")
                conn.execute("DO $$ BEGIN RAISE EXCEPTION 'the shop changed its mind'; END $$")
        rows = conn.execute(
            "SELECT transaction_id, click_id, status, amount::text, currency, attributes FROM postback.conversions "
            "WHERE event = %s ORDER BY id", (t,)).fetchall()
        assert [r[:5] for r in rows] == [(f"{t}-1", "k1", "pending", "10.00", "EUR"),
                                        (f"{t}-3", "k2", "pending", "7.50", "EUR"),
                                        (f"{t}-4", "k3", "pending", "99.90", "EUR")]
        # unmapped columns go to attributes, excluded and mapped-by-name ones do not
        assert rows[0][5] == {"id": 1, "state": "new"}
        cluster.wait_for(lambda: len(sent(receiver, t)) == 3, what="three postbacks")
        assert sorted(sent(receiver, t)) == [(f"{t}-1", "pending", "10.00"), (f"{t}-3", "pending", "7.50"),
                                             (f"{t}-4", "pending", "99.90")]
        # "why didn't it fire?" works for a watched row by its transaction id
        why = conn.execute("SELECT endpoint, fired, states FROM postback.explain(%s)", (f"{t}-1",)).fetchall()
        assert (t, True, ["succeeded"]) in why
        with pytest.raises(psycopg.errors.NoDataFound) as e:
            conn.execute("SELECT * FROM postback.explain(%s)", (f"{t}-2",))
        assert "watch" in e.value.diag.message_hint
        assert conn.execute("SELECT source::text, owner FROM postback.watches WHERE source = %s::regclass",
                            (t,)).fetchone() == (t, "postgres")


@pytest.mark.parametrize("primary_key", [True, False], ids=["by statement", "row by row"])
def test_updates_of_mapped_fields_announce_statuses_in_order_and_delete_maps_to_its_status(cluster, receiver,
                                                                                           primary_key):
    # with a primary key, one statement pairs an UPDATE's old and new rows; without, row by row
    with cluster.connect() as conn:
        t = orders_table(conn, primary_key=primary_key)
        endpoint(conn, receiver, t)
        conn.execute("SELECT postback.watch(%s, %s)", (t, mapping(t, on_delete="reversed")))
        conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k1', 10), ('k2', 20), (NULL, 30)")
        level = conn.execute("SELECT CASE WHEN tgtype & 1 = 1 THEN 'row' ELSE 'statement' END FROM pg_trigger "
                             "WHERE tgrelid = %s::regclass AND tgname = 'postback_watch_update'", (t,)).fetchone()[0]
        assert level == ("statement" if primary_key else "row")
        conn.execute(f"UPDATE {t} SET state = 'paid' WHERE id = 1")
        conn.execute(f"UPDATE {t} SET email = 'x@shop.test' WHERE id = 1")  # not mapped: no postback
        conn.execute(f"UPDATE {t} SET state = 'refunded' WHERE id = 1")
        conn.execute(f"UPDATE {t} SET click = 'k3' WHERE id = 3")  # the click arrives: now a conversion
        conn.execute(f"UPDATE {t} SET total = total WHERE id <= 3")  # nothing mapped changes: nothing sent
        conn.execute(f"DELETE FROM {t} WHERE id = 2")  # on_delete: reversed
        cluster.wait_for(lambda: len(sent(receiver, t)) == 6, what="six postbacks")
        got = sent(receiver, t)
        assert [g for g in got if g[0] == f"{t}-1"] == [(f"{t}-1", "pending", "10.00"), (f"{t}-1", "approved", "10.00"),
                                                      (f"{t}-1", "refunded", "10.00")]
        assert [g for g in got if g[0] == f"{t}-2"] == [(f"{t}-2", "pending", "20.00"), (f"{t}-2", "reversed", "20.00")]
        assert [g for g in got if g[0] == f"{t}-3"] == [(f"{t}-3", "pending", "30.00")]
        assert conn.execute("SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e "
                            "ON e.id = d.endpoint_id WHERE e.name = %s", (t,)).fetchone()[0] == 6
        # unwatch: the table is the shop's again; conversions written stay
        assert conn.execute("SELECT postback.unwatch(%s)", (t,)).fetchone()[0] is True
        conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k4', 40)")
        conn.execute(f"UPDATE {t} SET state = 'paid' WHERE id = 3")
        assert conn.execute("SELECT count(*) FROM postback.conversions WHERE event = %s", (t,)).fetchone()[0] == 3
        assert conn.execute("SELECT postback.unwatch(%s)", (t,)).fetchone()[0] is False
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = %s", (f"{t}_postback_watch",)).fetchone()[0] == 0


def test_watching_again_replaces_the_mapping(cluster):
    with cluster.connect() as conn:
        t = orders_table(conn)
        conn.execute("SELECT postback.watch(%s, %s)", (t, mapping(t, on_delete="reversed")))
        conn.execute("SELECT postback.watch(%s, %s)", (t, mapping(t, attributes="jsonb_build_object('shop', 'eu')")))
        conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k1', 10)")
        assert conn.execute("SELECT attributes FROM postback.conversions WHERE transaction_id = %s",
                            (f"{t}-1",)).fetchone()[0] == {"shop": "eu"}
        conn.execute(f"DELETE FROM {t}")  # no on_delete any more
        assert conn.execute("SELECT status FROM postback.conversions WHERE transaction_id = %s",
                            (f"{t}-1",)).fetchone()[0] == "pending"
        w = conn.execute("SELECT mapping, on_delete FROM postback.watches WHERE source = %s::regclass", (t,)).fetchall()
        assert len(w) == 1 and w[0][1] is False and w[0][0]["attributes"] == "jsonb_build_object('shop', 'eu')"


def test_only_the_owner_watches_its_expressions_run_as_the_owner_and_writers_need_no_grant(cluster):
    with cluster.connect() as conn:
        n = next(counter)
        shop, clerk, other = f"shop{n}", f"clerk{n}", f"other{n}"
        for r in (shop, clerk, other):
            conn.execute(f"CREATE ROLE {r} LOGIN")
        t = orders_table(conn, owner=shop)
        conn.execute(f"GRANT INSERT, UPDATE ON {t} TO {clerk}")
        conn.execute("SELECT postback.grant_operator(%s)", (other,))
        m = mapping(t, attributes="jsonb_build_object('by', current_user, 'session', session_user)")
        # someone else, even an operator, cannot put a trigger on the shop's table
        conn.execute(f"SET ROLE {other}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("SELECT postback.watch(%s, %s)", (t, m))
        assert "must be the owner of table" in str(e.value)
        conn.execute("RESET ROLE")
        # the owner must be able to write conversions: the trigger writes them as the owner
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("SELECT postback.watch(%s, %s)", (t, m))
        assert f"postback.grant_operator('{shop}')" in e.value.diag.message_hint
        conn.execute("SELECT postback.grant_operator(%s)", (shop,))
        conn.execute(f"SET ROLE {shop}")
        # the trigger function goes beside the table: the owner must be able to create there
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("SELECT postback.watch(%s, %s)", (t, m))
        assert e.value.diag.message_hint == f"GRANT CREATE ON SCHEMA public TO {shop}; or let a superuser watch the table."
        conn.execute("RESET ROLE")
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {shop}")
        conn.execute(f"SET ROLE {shop}")
        conn.execute("SELECT postback.watch(%s, %s)", (t, m))
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT r.rolname, p.prosecdef, p.proconfig FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
                            "WHERE p.proname = %s", (f"{t}_postback_watch",)).fetchone() == (
            shop, True, ["search_path=pg_catalog, public, pg_temp"])
        # the clerk writes orders and has no grant on postback at all
        conn.execute(f"SET ROLE {clerk}")
        conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k1', 10)")
        conn.execute(f"UPDATE {t} SET state = 'paid'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM postback.conversions")
        conn.execute("RESET ROLE")
        row = conn.execute("SELECT status, attributes FROM postback.conversions WHERE transaction_id = %s",
                           (f"{t}-1",)).fetchone()
        assert row == ("approved", {"by": shop, "session": "postgres"})
        # nobody else can call the trigger function, and unwatch is the owner's too
        assert conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                            (clerk, f"public.{t}_postback_watch()")).fetchone()[0] is False
        conn.execute(f"SET ROLE {other}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT postback.unwatch(%s)", (t,))
        conn.execute("RESET ROLE")


BAD = [
    ({"click_id": "click"}, "22023", 'the mapping has no "transaction_id"'),
    ({"click_id": "clik", "transaction_id": "id"}, "42703", 'mapping field "click_id" (clik): column "clik" does not exist'),
    ({"click_id": "click", "transaction_id": "id", "amount": "email"}, "42804",
     'mapping field "amount" (email) is of type text, which cannot be written as numeric'),
    ({"click_id": "click", "transaction_id": "id", "when": "total"}, "42804", 'mapping field "when" (total) is of type numeric'),
    ({"click_id": "click", "transaction_id": 5}, "22023", 'mapping field "transaction_id" must be a column name'),
    ({"click_id": "click", "transaction_id": "id", "payout": "total"}, "22023", 'unknown mapping key "payout"'),
    ({"click_id": "click", "transaction_id": "id", "exclude": ["card"]}, "42703", 'mapping "exclude" names "card"'),
    ({"click_id": "click", "transaction_id": "id", "on_delete": "gone"}, "22023", 'mapping "on_delete" must be the status'),
    ({"click_id": "click", "transaction_id": "oid) FROM pg_catalog.pg_class r; CREATE TABLE public.pwned (); SELECT (1"},
     "42P11", 'mapping field "transaction_id"'),
    ({"click_id": "click", "transaction_id": "id", "amount": "sum(total)"}, "42803",
     "the mapping's fields do not make one row per row"),
]


@pytest.mark.parametrize("bad,sqlstate,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_mappings_are_refused_naming_the_field(cluster, bad, sqlstate, message):
    with cluster.connect() as conn:
        t = orders_table(conn)
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT postback.watch(%s, %s)", (t, json.dumps(bad)))
        assert e.value.sqlstate == sqlstate, str(e.value)
        assert message in str(e.value)
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass", (t,)).fetchone()[0] == 0
        assert conn.execute("SELECT to_regclass('public.pwned')").fetchone()[0] is None
        # a view is not a table
        conn.execute(f"CREATE VIEW {t}_v AS SELECT * FROM {t}")
        with pytest.raises(psycopg.errors.WrongObjectType):
            conn.execute("SELECT postback.watch(%s, %s)", (f"{t}_v", mapping(t)))


def test_pg_dump_and_restore_keep_the_watch_and_drop_extension_names_it(make_cluster, receiver):
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        t = orders_table(conn)
        endpoint(conn, receiver, t)
        conn.execute("SELECT postback.watch(%s, %s)", (t, mapping(t, on_delete="reversed")))
        conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k1', 10), ('k2', 20)")
        c.wait_for(lambda: len(sent(receiver, t)) == 2, what="two postbacks")
        with pytest.raises(psycopg.errors.DependentObjectsStillExist) as e:
            conn.execute("DROP EXTENSION pg_postback")
        assert f"trigger postback_watch_insert on table {t}" in e.value.diag.message_detail
        conn.execute("CREATE DATABASE restored")
    dump = f"{c.datadir}/watch.pgc"
    as_postgres([f"{PG_BIN}/pg_dump", "-h", "127.0.0.1", "-p", str(c.port), "-U", "postgres", "-Fc",
                 "-f", dump, "postgres"])
    as_postgres([f"{PG_BIN}/pg_restore", "-h", "127.0.0.1", "-p", str(c.port), "-U", "postgres",
                 "--exit-on-error", "-d", "restored", dump])
    with c.connect("restored") as conn:
        # restoring the rows fired nothing twice
        assert conn.execute("SELECT count(*) FROM postback.conversions").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM postback.deliveries").fetchone()[0] == 2
        w = conn.execute("SELECT source::text, mapping FROM postback.watches").fetchall()
        assert w == [(t, json.loads(mapping(t, on_delete="reversed")))]
        conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k3', 30)")
        conn.execute(f"DELETE FROM {t} WHERE id = 1")
        assert conn.execute("SELECT transaction_id, status FROM postback.conversions ORDER BY id").fetchall() == [
            (f"{t}-1", "reversed"), (f"{t}-2", "pending"), (f"{t}-3", "pending")]
        # DROP EXTENSION … CASCADE takes the watch along, and the table works on
        conn.execute("DROP EXTENSION pg_postback CASCADE")
        conn.execute(f"INSERT INTO {t} (click, total) VALUES ('k4', 40)")
        assert conn.execute(f"SELECT count(*) FROM pg_trigger WHERE tgrelid = '{t}'::regclass").fetchone()[0] == 0


def test_a_partitioned_table_is_watched_through_the_table_and_straight_into_its_partitions(cluster):
    with cluster.connect() as conn:
        t = f"sales{next(counter)}"
        conn.execute(f"CREATE TABLE {t} (id int, region text, click text, amount numeric, PRIMARY KEY (id, region)) "
                     "PARTITION BY LIST (region)")
        conn.execute(f"CREATE TABLE {t}_eu PARTITION OF {t} FOR VALUES IN ('eu')")
        conn.execute(f"CREATE TABLE {t}_us PARTITION OF {t} FOR VALUES IN ('us')")
        conn.execute("SELECT postback.watch(%s, %s)", (t, json.dumps({
            "click_id": "click", "transaction_id": f"'{t}-' || region || '-' || id", "amount": "amount",
            "status": "CASE WHEN amount < 0 THEN 'refunded' ELSE 'approved' END", "on_delete": "reversed"})))
        conn.execute(f"INSERT INTO {t} VALUES (1, 'eu', 'k1', 5), (2, 'us', 'k2', 6)")
        conn.execute(f"INSERT INTO {t}_eu VALUES (3, 'eu', 'k3', 7)")  # straight into a partition
        conn.execute(f"UPDATE {t}_eu SET amount = -5 WHERE id = 1")
        conn.execute(f"UPDATE {t} SET amount = -6 WHERE id = 3")
        conn.execute(f"DELETE FROM {t}_us WHERE id = 2")
        got = conn.execute("SELECT transaction_id, status, amount::text FROM postback.conversions "
                           "WHERE transaction_id LIKE %s ORDER BY 1", (f"{t}-%",)).fetchall()
        assert got == [(f"{t}-eu-1", "refunded", "-5"), (f"{t}-eu-3", "refunded", "-6"),
                       (f"{t}-us-2", "reversed", "6")]
        # a partition attached later is not watched until watch runs again: the view says so
        conn.execute(f"CREATE TABLE {t}_apac PARTITION OF {t} FOR VALUES IN ('apac')")
        q = "SELECT partitions_unwatched FROM postback.watches WHERE source = %s::regclass"
        assert conn.execute(q, (t,)).fetchone()[0] == 1
        conn.execute("SELECT postback.watch(w.source, w.mapping) FROM postback.watches w WHERE w.source = %s::regclass",
                     (t,))
        assert conn.execute(q, (t,)).fetchone()[0] == 0
        conn.execute(f"INSERT INTO {t}_apac VALUES (4, 'apac', 'k4', 8)")
        assert conn.execute("SELECT count(*) FROM postback.conversions WHERE transaction_id = %s",
                            (f"{t}-apac-4",)).fetchone()[0] == 1
        assert conn.execute("SELECT postback.unwatch(%s)", (t,)).fetchone()[0] is True
        assert conn.execute("SELECT count(*) FROM pg_trigger g JOIN pg_partition_tree(%s::regclass) p "
                            "ON p.relid = g.tgrelid WHERE g.tgname LIKE 'postback_watch%%'", (t,)).fetchone()[0] == 0
