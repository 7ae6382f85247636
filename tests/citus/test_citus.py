"""pg_postback on Citus, coordinator-only mode and distributed mode (make citus-test; not part of make test).

A coordinator and two worker nodes on one machine (Citus 13.2.2 from ../shared/citus,
built and installed when missing). Only the coordinator preloads pg_postback:
`CREATE EXTENSION pg_postback` there is propagated to every node, its tables stay local
to the coordinator, and its worker delivers. Shown here:

- conversions written on the coordinator (single rows, multi-row, COPY, INSERT … SELECT
  from a distributed table) and their lifecycle updates are each delivered exactly once,
  in order, and the views answer;
- on a worker node, writes to pg_postback's tables are refused with a message naming the
  coordinator (read_only_sql_transaction), and its copies stay empty.

Distributed mode (postback.distribute(), every node preloading pg_postback): the triggers
run on the shards, each node delivers its own shards (20,000 conversions each delivered
once by the node holding it), a SIGKILLed worker and a node added with shards rebalanced
mid-run lose nothing, operators work from the coordinator, and an update that would miss
the shards is refused.
"""

import os
import subprocess
import sys
import time

import psycopg
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from cluster import Cluster  # noqa: E402
from receiver import Receiver  # noqa: E402

CITUS = os.path.normpath(os.path.join(ROOT, "..", "shared", "citus"))
PG_CONFIG = "/usr/lib/postgresql/15/bin/pg_config"


def citus_installed():
    libdir = subprocess.check_output([PG_CONFIG, "--pkglibdir"]).decode().strip()
    return os.path.exists(os.path.join(libdir, "citus.so"))


def ensure_citus():
    if not citus_installed():
        if not os.path.exists(os.path.join(CITUS, "build.sh")):
            pytest.skip(f"Citus is not installed and {CITUS}/build.sh is missing: nothing to build it from")
        subprocess.run(["bash", os.path.join(CITUS, "build.sh")], check=True)


def start_cluster(made, version=None, settings=None, workers_preload="'citus'", every_node=None):
    """A coordinator (preloading citus and pg_postback) and two workers (citus only, unless
    `workers_preload` says otherwise), with pg_postback created on the coordinator (at
    `version`, or the current one). `settings` go to the coordinator, `every_node` to all."""
    ensure_citus()
    common = dict({"max_worker_processes": "32", "max_prepared_transactions": "100"}, **(every_node or {}))
    coordinator = Cluster.create(settings=dict(common, shared_preload_libraries="'citus,pg_postback'",
                                                **(settings or {})))
    workers = [Cluster.create(settings=dict(common, shared_preload_libraries=workers_preload)) for _ in range(2)]
    made.extend([coordinator] + workers)
    for n in [coordinator] + workers:
        n.start()
        with n.connect() as conn:
            conn.execute("CREATE EXTENSION citus")
    with coordinator.connect() as conn:
        conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (coordinator.port,))
        for w in workers:
            conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (w.port,))
        if version:
            conn.execute(f"CREATE EXTENSION pg_postback VERSION '{version}'")
        else:
            conn.execute("CREATE EXTENSION pg_postback")
    return coordinator, workers


@pytest.fixture(scope="module")
def citus():
    """Coordinator + two workers shared by the tests of this module; yields (coordinator, [workers])."""
    made = []
    try:
        # the worker's fallback poll far away: a delivery within a second shows a commit woke it
        yield start_cluster(made, settings={"postback.poll_interval": "'30s'"})
    finally:
        for n in made:
            n.destroy()


@pytest.fixture
def citus_fresh():
    """Factory for a cluster of the test's own (e.g. with an earlier version installed)."""
    made = []
    try:
        yield lambda version=None, **kw: start_cluster(made, version, **kw)
    finally:
        for n in made:
            n.destroy()


def delivered(receiver, path):
    return sorted(g["query"]["tx"] + ":" + g["query"]["st"] for g in receiver.seen(path))


def test_the_extension_reaches_every_node_and_only_the_coordinator_delivers(citus):
    coordinator, workers = citus
    for w in workers:
        with w.connect() as conn:
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_postback'").fetchone()
    with coordinator.connect() as conn:
        coordinator.wait_for(lambda: conn.execute(
            "SELECT count(*) FROM postback.worker_status() WHERE running AND role = 'delivery'").fetchone()[0] == 1,
            what="the coordinator's delivery worker")


def test_conversions_written_on_the_coordinator_are_delivered_once_in_order(citus):
    coordinator, _ = citus
    r = Receiver().start()
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template, statuses) VALUES ('net', %s, "
                         "'{pending,approved,reversed}')", (r.url("/pb?tx={transaction_id}&st={status}"),))
            # single rows, multi-row, COPY
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, status) "
                         "VALUES ('k1', 'single-1', 'pending')")
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, status) "
                         "VALUES ('k2', 'multi-1', 'pending'), ('k3', 'multi-2', 'pending')")
            with conn.cursor() as cur:
                with cur.copy("COPY postback.conversions (click_id, transaction_id, status) FROM STDIN") as copy:
                    for i in range(1, 51):
                        copy.write_row((f"c{i}", f"copy-{i}", "pending"))
            # INSERT … SELECT from a distributed table of the application's
            conn.execute("CREATE TABLE public.orders (order_id text PRIMARY KEY, click_id text)")
            conn.execute("SELECT create_distributed_table('public.orders', 'order_id')")
            conn.execute("INSERT INTO public.orders SELECT 'order-' || g, 'o' || g FROM generate_series(1, 500) g")
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, status) "
                         "SELECT o.click_id, o.order_id, 'pending' FROM public.orders o")
            conn.execute("UPDATE postback.conversions SET status = 'approved'")
            conn.execute("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id LIKE 'order-1%'")
            total = conn.execute("SELECT count(*) FROM postback.conversions").fetchone()[0]
            assert total == 553
            reversed_ = conn.execute(
                "SELECT count(*) FROM postback.conversions WHERE status = 'reversed'").fetchone()[0]
            coordinator.wait_for(lambda: len(r.seen("/pb")) == 2 * total + reversed_, timeout=60,
                                 what="every status of every conversion delivered")
            time.sleep(0.5)
            seen = delivered(r, "/pb")
            assert len(seen) == len(set(seen)) == 2 * total + reversed_
            # per conversion, its statuses arrive in the order they were set
            order = {}
            for g in r.seen("/pb"):
                order.setdefault(g["query"]["tx"], []).append(g["query"]["st"])
            assert all(v in (["pending", "approved"], ["pending", "approved", "reversed"]) for v in order.values())
            assert conn.execute("SELECT count(*) FROM postback.attempts").fetchone()[0] == 2 * total + reversed_
            for view in ("endpoint_health", "metrics", "dead_letters", "match_rate", "delivery_summary"):
                conn.execute(f"SELECT * FROM postback.{view}").fetchall()
    finally:
        r.stop()


def test_a_two_phase_commit_that_also_writes_conversions_wakes_the_worker(citus):
    """A transaction on the coordinator that writes a distributed table on both workers
    (Citus commits it in two phases) and a conversion: the coordinator's worker is woken
    by the commit, not found by its poll (30 s here)."""
    coordinator, _ = citus
    r = Receiver().start()
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template, events) VALUES ('tpc', %s, '{tpc}')",
                         (r.url("/tpc?tx={transaction_id}"),))
            conn.execute("CREATE TABLE public.payments (payment_id text PRIMARY KEY, amount numeric)")
            conn.execute("SELECT create_distributed_table('public.payments', 'payment_id')")
            prepared = conn.execute("SELECT count(*) FROM pg_dist_transaction").fetchone()[0]
            time.sleep(0.5)
            conn.execute("BEGIN")
            conn.execute("INSERT INTO public.payments SELECT 'p-' || g, g FROM generate_series(1, 100) g")
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                         "VALUES ('k-tpc', 'tpc-1', 'tpc')")
            conn.execute("COMMIT")
            committed = time.monotonic()
            coordinator.wait_for(lambda: r.seen("/tpc"), timeout=10, what="the conversion's delivery")
            took = time.monotonic() - committed
            # Citus prepared it on the workers (the records stay until its 2PC recovery runs)
            assert conn.execute("SELECT count(*) FROM pg_dist_transaction").fetchone()[0] > prepared
        assert took < 2.0, f"delivered {took:.1f} s after the commit: the poll found it, the commit did not wake"
    finally:
        r.stop()


@pytest.mark.parametrize("statement", [
    "INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('w', 'on-a-worker')",
    "INSERT INTO postback.clicks (click_id) VALUES ('w')",
    "INSERT INTO postback.endpoints (name, url_template) VALUES ('w', 'http://127.0.0.1:9/w')",
    "UPDATE postback.conversions SET status = 'approved'",
    "DELETE FROM postback.deliveries",
    "TRUNCATE postback.clicks",
])
def test_writes_on_a_worker_node_are_refused_naming_the_coordinator(citus, statement):
    coordinator, workers = citus
    with workers[0].connect() as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused:
            conn.execute(statement)
        message = str(refused.value)
        assert f"runs on the coordinator (127.0.0.1:{coordinator.port})" in message, message
        assert f"worker node (127.0.0.1:{workers[0].port})" in message, message
        assert refused.value.diag.message_hint == (
            f"Connect to the coordinator (127.0.0.1:{coordinator.port}) to write postback."
            + statement.split("postback.")[1].split(" ")[0] + ".")
        assert conn.execute("SELECT (SELECT count(*) FROM postback.conversions) + "
                            "(SELECT count(*) FROM postback.clicks)").fetchone()[0] == 0


def test_the_update_from_0_2_0_reaches_every_node(citus_fresh):
    """ALTER EXTENSION pg_postback UPDATE on the coordinator updates the extension on every
    node (Citus propagates it); the coordinator's data and pending deliveries survive and
    are delivered."""
    coordinator, workers = citus_fresh(version="0.2.0")
    r = Receiver().start()
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('up', %s)",
                         (r.url("/up?tx={transaction_id}&st={status}"),))
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT 'k' || g, 'up-' || g FROM generate_series(1, 20) g")
            conn.execute("ALTER EXTENSION pg_postback UPDATE")
            coordinator.wait_for(lambda: len(r.seen("/up")) == 20, timeout=30, what="the 0.2.0 deliveries")
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('n', 'after')")
            coordinator.wait_for(lambda: len(r.seen("/up")) == 21, what="a delivery after the update")
        for node in [coordinator] + workers:
            with node.connect() as conn:
                assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_postback'"
                                    ).fetchone()[0] == "0.3.0"
        with workers[0].connect() as conn:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO postback.clicks (click_id) VALUES ('w')")
    finally:
        r.stop()


def test_a_worker_node_that_preloads_pg_postback_waits_quietly_and_says_why(citus_fresh):
    """Against the README, pg_postback preloaded on the worker nodes too: their workers find
    pg_postback's tables are the coordinator's (coordinator-only mode), say so once in the
    log and in worker_status(), and claim nothing (no refused statement every loop)."""
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'")
    r = Receiver().start()
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('quiet', %s)",
                         (r.url("/quiet?tx={transaction_id}"),))
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT 'k' || g, 'quiet-' || g FROM generate_series(1, 10) g")
            coordinator.wait_for(lambda: len(r.seen("/quiet")) == 10, what="the coordinator's deliveries")
        for w in workers:
            with w.connect() as conn:
                states = w.wait_for(lambda: [row for row in conn.execute(
                    "SELECT role, state FROM postback.worker_status() WHERE running").fetchall()
                    if row[1] and row[1].startswith("idle: a Citus worker node")], what="the idle state")
                assert f"live on the coordinator (127.0.0.1:{coordinator.port})" in states[0][1], states
            time.sleep(6)  # longer than a wait of the worker: it looked again and said nothing more
            log = w.log()
            assert log.count("a Citus worker node: pg_postback's tables live on the coordinator") == 1, log[-3000:]
            assert "cannot be written on a worker node" not in log, log[-3000:]
        assert sorted(g["query"]["tx"] for g in r.seen("/quiet")) == sorted(f"quiet-{g}" for g in range(1, 11))
    finally:
        r.stop()


# Distributed mode: postback.distribute() on the coordinator; every node preloads
# pg_postback and delivers the deliveries of its own shards.
def distribute(coordinator, shard_count=8):
    """postback.distribute() on the coordinator: the one call of distributed mode."""
    with coordinator.connect() as conn:
        said = conn.execute("SELECT postback.distribute(%s)", (shard_count,)).fetchone()[0]
    assert said.startswith(f"distributed: clicks, conversions, deliveries and attempts in {shard_count} shards"), said
    return said


def local_shards(conn, table):
    """This node's shards of a distributed postback table, by shard id."""
    return [r[0] for r in conn.execute(
        "SELECT s.shardid FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid) "
        "WHERE s.logicalrelid = %s::regclass AND p.groupid = (SELECT groupid FROM pg_dist_local_group) "
        "ORDER BY s.shardminvalue::bigint", (table,)).fetchall()]


def wait_for_shards(nodes):
    """Until every node's delivery worker has found its shards (a housekeeping round, 5 s)."""
    for node in nodes:
        with node.connect() as conn:
            node.wait_for(lambda: conn.execute(
                "SELECT state FROM postback.worker_status() WHERE role = 'delivery'").fetchone()[0].endswith(
                "Citus shards of postback.deliveries on this node"), what="the worker finding its shards")


def test_distributed_the_enqueue_trigger_writes_each_delivery_beside_its_conversion(citus_fresh):
    """The enqueue and validation triggers run on the shard's node, read the co-located
    clicks shard and this node's placement of endpoints, and write each delivery (and each
    lifecycle delivery, behind its predecessor) into the co-located deliveries shard (a statement on a shard never names a Citus table: Citus
    refuses that inside a query on a shard). Nobody delivers here: the per-shard worker is
    the next step."""
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'")
    distribute(coordinator)
    with coordinator.connect() as conn:
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', "
                     "'http://127.0.0.1:9/pb?tx={transaction_id}&s1={click.sub1}')")
        conn.execute("INSERT INTO postback.clicks (click_id, attributes) "
                     "SELECT 'k' || g, jsonb_build_object('sub1', 's' || g) FROM generate_series(1, 300) g")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('k1', 'one')")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                     "SELECT 'k' || g, 'many-' || g FROM generate_series(2, 200) g")
        with conn.cursor().copy("COPY postback.conversions (click_id, transaction_id) FROM STDIN") as copy:
            for g in range(201, 301):
                copy.write_row((f"k{g}", f"copied-{g}"))
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM postback.deliveries").fetchone() == (300, 300)
        # each delivery beside its conversion (a co-located join), with its click's sub-id
        assert conn.execute(
            "SELECT count(*) FROM postback.deliveries d JOIN postback.conversions c "
            "ON c.click_id = d.click_id AND c.id = d.conversion_id "
            "WHERE d.url LIKE '%&s1=s' || substr(c.click_id, 2)").fetchone()[0] == 300
        # a lifecycle UPDATE through the coordinator (on every shard at once): each new
        # status waits behind its conversion's first delivery, in the same shard
        conn.execute("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id LIKE 'many-%'")
        assert conn.execute(
            "SELECT count(*) FROM postback.deliveries d JOIN postback.deliveries p "
            "ON p.click_id = d.click_id AND p.id = d.predecessor_id "
            "WHERE d.status = 'reversed' AND p.status = 'approved' AND p.conversion_id = d.conversion_id"
        ).fetchone()[0] == 199
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM postback.deliveries").fetchone() == (499, 499)
    per_node = []
    for w in workers:
        with w.connect() as conn:
            conversions = local_shards(conn, "postback.conversions")
            deliveries = local_shards(conn, "postback.deliveries")
            assert len(conversions) == len(deliveries) > 0
            for c_shard, d_shard in zip(conversions, deliveries):
                here = conn.execute(f"SELECT count(*) + count(*) FILTER (WHERE status = 'reversed') "
                                    f"FROM postback.conversions_{c_shard}").fetchone()[0]
                written = conn.execute(f"SELECT count(*) FROM postback.deliveries_{d_shard}").fetchone()[0]
                assert written == here, (c_shard, d_shard, here, written)
            per_node.append(sum(conn.execute(f"SELECT count(*) FROM postback.deliveries_{d}").fetchone()[0]
                                for d in deliveries))
    assert sum(per_node) == 499 and all(n > 0 for n in per_node), per_node


def test_distributed_each_node_delivers_the_deliveries_of_its_shards(citus_fresh):
    """Every node preloads pg_postback: each worker node's worker claims from its own
    deliveries shards (through postback.node_deliveries, which they inherit), sends, and
    records each attempt in the attempts shard beside the delivery's; the coordinator,
    holding no shard, sends nothing. Each conversion is delivered exactly once. The
    workers' fallback poll is 30 s: a statement writing both worker nodes commits there in
    two phases, and COMMIT PREPARED wakes each node's worker."""
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'",
                                       every_node={"postback.poll_interval": "'30s'"})
    distribute(coordinator)
    wait_for_shards([coordinator] + workers)
    time.sleep(1)  # the workers asleep on their 30 s poll
    with coordinator.connect() as conn:
        assert conn.execute("SELECT state FROM postback.worker_status() WHERE role = 'delivery'").fetchone()[0] == \
            "delivering: 0 Citus shards of postback.deliveries on this node"
    r = Receiver().start()
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', %s)",
                         (r.url("/d?tx={transaction_id}"),))
            started = time.monotonic()
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT 'k' || g, 'd-' || g FROM generate_series(1, 200) g")
            with conn.cursor().copy("COPY postback.conversions (click_id, transaction_id) FROM STDIN") as copy:
                for g in range(201, 301):
                    copy.write_row((f"k{g}", f"d-{g}"))
            coordinator.wait_for(lambda: len(r.seen("/d")) >= 300, timeout=60, what="300 deliveries")
            elapsed = time.monotonic() - started
            # the COPY commits while each node's endpoint is busy with the INSERT's
            # deliveries: they follow at once, not at the next housekeeping round (5 s)
            times = sorted(g["time"] for g in r.seen("/d"))
            gap = max(b - a for a, b in zip(times, times[1:]))
            assert gap < 1.5, f"deliveries stopped for {gap:.1f} s: a commit's were left to a poll"
            time.sleep(1)
            sent = sorted(g["query"]["tx"] for g in r.seen("/d"))
            assert sent == sorted(f"d-{g}" for g in range(1, 301)), "each exactly once"
            coordinator.wait_for(lambda: conn.execute(
                "SELECT count(*) FROM postback.deliveries WHERE state = 'succeeded'").fetchone()[0] == 300,
                what="300 recorded")
            assert conn.execute("SELECT count(*), count(DISTINCT id) FROM postback.attempts").fetchone() == (300, 300)
            # every attempt beside its delivery (a co-located join)
            assert conn.execute("SELECT count(*) FROM postback.attempts a JOIN postback.deliveries d "
                                "ON d.click_id = a.click_id AND d.id = a.delivery_id").fetchone()[0] == 300
        per_node = []
        for w in workers:
            with w.connect() as conn:
                shards = local_shards(conn, "postback.deliveries")
                mine = sum(conn.execute(f"SELECT count(*) FROM postback.deliveries_{d} WHERE state = 'succeeded'"
                                        ).fetchone()[0] for d in shards)
                attempts = sum(conn.execute(f"SELECT count(*) FROM postback.attempts_{a}").fetchone()[0]
                               for a in local_shards(conn, "postback.attempts"))
                assert attempts == mine
                per_node.append(mine)
        assert sum(per_node) == 300 and all(n > 0 for n in per_node), per_node
        # a statement writing both worker nodes commits there in two phases: COMMIT
        # PREPARED wakes each node's worker (else the 30 s poll, or a housekeeping round
        # every 5 s, would find them); three rounds, at moments of their own
        took = []
        with coordinator.connect() as conn:
            for n in range(3):
                time.sleep(0.7 + n)
                conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                             "SELECT 'k' || g, %s || g FROM generate_series(1, 20) g", (f"tpc{n}-",))
                committed = time.monotonic()
                coordinator.wait_for(lambda: len(r.seen("/d")) >= 300 + 20 * (n + 1), timeout=30,
                                     interval=0.01, what="20 deliveries on both worker nodes")
                took.append(time.monotonic() - committed)
        assert max(took) < 1.5, f"{took}: a poll found them, the two-phase commits did not wake the workers"
        print(f"\ndelivered by node: {per_node}; {300 / elapsed:.0f} deliveries/s in total "
              f"(one machine, three nodes: correctness, not speed); two-phase commit to delivery: "
              f"{', '.join(f'{t * 1000:.0f} ms' for t in took)}")
    finally:
        r.stop()


def test_distributed_a_node_whose_worker_is_killed_loses_nothing(citus_fresh):
    """A worker node's pg_postback worker SIGKILLed mid-run (the node's postmaster resets,
    as after any crash of a backend): every conversion is still delivered, the interrupted
    attempts are recorded in the attempts shard beside their delivery (interrupted: …)
    and retried; at-least-once, so a resend is allowed, a loss is not."""
    import signal
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'")
    distribute(coordinator)
    wait_for_shards([coordinator] + workers)
    r = Receiver().start()
    try:
        # slow answers keep requests in flight when the worker dies
        r.script("/k", *([{"status": 200, "delay": 0.05}] * 4000))
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template, max_in_flight) VALUES ('net', %s, 32)",
                         (r.url("/k?tx={transaction_id}"),))
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT 'k' || g, 'k-' || g FROM generate_series(1, 2000) g")
        victim = workers[0]
        with victim.connect() as conn:
            pid = victim.wait_for(lambda: conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_postback worker'").fetchone(),
                what="the victim's worker")[0]
            victim.wait_for(lambda: conn.execute(
                "SELECT count(*) > 0 FROM postback.node_deliveries WHERE state = 'in_flight'").fetchone()[0],
                what="requests in flight")
        os.kill(pid, signal.SIGKILL)

        def all_succeeded():
            try:  # the victim's node restarts (its postmaster resets): errors until it is back
                return conn.execute("SELECT count(*) FROM postback.deliveries WHERE state = 'succeeded'"
                                    ).fetchone()[0] == 2000
            except psycopg.Error:
                return False

        with coordinator.connect() as conn:
            coordinator.wait_for(all_succeeded, timeout=120, what="2,000 deliveries succeeded")
            sent = {g["query"]["tx"] for g in r.seen("/k")}
            assert sent == {f"k-{g}" for g in range(1, 2001)}, "nothing lost"
            interrupted = conn.execute("SELECT count(*) FROM postback.attempts WHERE error LIKE 'interrupted:%'"
                                       ).fetchone()[0]
            assert interrupted > 0
            # every attempt, interrupted ones included, beside its delivery
            beside = conn.execute("SELECT count(*) FROM postback.attempts a JOIN postback.deliveries d "
                                  "ON d.click_id = a.click_id AND d.id = a.delivery_id").fetchone()[0]
            assert beside == conn.execute("SELECT count(*) FROM postback.attempts").fetchone()[0]
            print(f"\n{interrupted} attempts interrupted by the SIGKILL, recorded and retried; "
                  f"{len(r.seen('/k')) - 2000} sent twice (at-least-once)")
    finally:
        r.stop()


def test_distributed_a_node_added_and_shards_rebalanced_mid_run_lose_nothing(citus_fresh, made_extra):
    """A third node joins (preloading pg_postback; its copy of the extension has the
    click_id columns Citus' metadata names) and the shards are rebalanced while
    conversions keep coming: the moved shards' deliveries go on from their new node
    (its worker adopts them within a housekeeping round), nothing is lost."""
    import threading
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'")
    distribute(coordinator)
    r = Receiver().start()
    third = Cluster.create(settings={"max_worker_processes": "32", "max_prepared_transactions": "100",
                                     "shared_preload_libraries": "'citus,pg_postback'"})
    made_extra.append(third)
    third.start()
    with third.connect() as conn:
        conn.execute("CREATE EXTENSION citus")
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', %s)",
                         (r.url("/m?tx={transaction_id}"),))
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT 'k' || g, 'm-' || g FROM generate_series(1, 1000) g")
            conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (third.port,))
            # the reference tables' placements on the new node, before shards move there
            conn.execute("SELECT replicate_reference_tables(shard_transfer_mode := 'block_writes')")
        def keep_converting():
            with coordinator.connect() as conn:
                for batch in range(20):
                    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                                 "SELECT 'k' || g, 'm-' || g FROM generate_series(%s::int, %s::int) g",
                                 (1001 + batch * 50, 1050 + batch * 50))
                    time.sleep(0.1)

        writer = threading.Thread(target=keep_converting)
        writer.start()
        with coordinator.connect() as conn:
            conn.execute("SELECT citus_rebalance_start(shard_transfer_mode := 'block_writes')")
            conn.execute("SELECT citus_rebalance_wait()")
        writer.join()
        with third.connect() as conn:
            moved = local_shards(conn, "postback.deliveries")
            assert moved, "the rebalance moved shards to the new node"

        def all_succeeded():
            with coordinator.connect() as conn:
                return conn.execute("SELECT count(*) FROM postback.deliveries WHERE state = 'succeeded'"
                                    ).fetchone()[0] == 2000

        try:
            coordinator.wait_for(all_succeeded, timeout=40, what="2,000 deliveries succeeded")
        except AssertionError:
            with coordinator.connect() as conn:
                print(conn.execute("SELECT state, count(*) FROM postback.deliveries GROUP BY 1").fetchall())
            for n in [coordinator] + workers + [third]:
                with n.connect() as conn:
                    print(n.port, conn.execute("SELECT state, last_error FROM postback.worker_status()").fetchall())
                print("\n".join(l for l in n.log().splitlines() if "WARNING" in l or "ERROR" in l)[-1500:])
            raise
        assert {g["query"]["tx"] for g in r.seen("/m")} == {f"m-{g}" for g in range(1, 2001)}, "nothing lost"
        with third.connect() as conn:
            here = sum(conn.execute(f"SELECT count(*) FROM postback.deliveries_{d} WHERE state = 'succeeded'"
                                    ).fetchone()[0] for d in moved)
        print(f"\n{len(moved)} shards moved to the new node, holding {here} succeeded deliveries; "
              f"{len(r.seen('/m')) - 2000} sent twice (at-least-once)")
    finally:
        r.stop()


def test_distribute_refuses_what_would_leave_deliveries_unsent_and_changes_nothing(citus_fresh):
    """Worker nodes that do not preload pg_postback would never send their shards'
    deliveries: refused, naming each node; on a worker node: refused, naming the
    coordinator. Nothing is distributed after either."""
    coordinator, workers = citus_fresh()
    with coordinator.connect() as conn:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as e:
            conn.execute("SELECT postback.distribute()")
        for w in workers:
            assert f"127.0.0.1:{w.port} (pg_postback is not in shared_preload_libraries" in str(e.value)
        assert "citus,pg_postback" in e.value.diag.message_hint
        assert conn.execute("SELECT postback.is_distributed()").fetchone()[0] is False
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT postback.distribute(0)")
    with workers[0].connect() as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
            conn.execute("SELECT postback.distribute()")
        assert f"the coordinator is 127.0.0.1:{coordinator.port}" in str(e.value)
    with coordinator.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text LIKE 'postback.%'"
                            ).fetchone()[0] == 0


def test_distribute_keeps_what_was_there_and_operators_work_from_the_coordinator(citus_fresh):
    """Conversions, deliveries and attempts written before distribute() come along (and
    enqueue nothing again); then from the coordinator: retry, replay, send_test, pause and
    resume, explain, curl, an endpoint edit, the delete guards, purge, and every view;
    cluster_worker_status() shows every node's workers."""
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'")
    r = Receiver().start()
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', %s)",
                         (r.url("/o?tx={transaction_id}&st={status}"),))
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT 'k' || g, 'pre-' || g FROM generate_series(1, 10) g")
            coordinator.wait_for(lambda: conn.execute(
                "SELECT count(*) FROM postback.deliveries WHERE state = 'succeeded'").fetchone()[0] == 10,
                what="10 delivered before distribute()")
            conn.execute("SELECT postback.send_test('net')")
            coordinator.wait_for(lambda: len(r.seen("/o")) == 11, what="the test request")
        distribute(coordinator)
        wait_for_shards([coordinator] + workers)
        with coordinator.connect() as conn:
            assert conn.execute("SELECT postback.distribute()").fetchone()[0] == "distributed already"
            assert conn.execute("SELECT count(*), count(*) FILTER (WHERE click_id = '') FROM postback.deliveries"
                                ).fetchone() == (11, 1)
            # every attempt from before beside its delivery
            assert conn.execute("SELECT count(*) FROM postback.attempts a JOIN postback.deliveries d "
                                "ON d.click_id = a.click_id AND d.id = a.delivery_id").fetchone()[0] == \
                conn.execute("SELECT count(*) FROM postback.attempts").fetchone()[0] >= 11
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT 'k' || g, 'post-' || g FROM generate_series(1, 20) g")
            coordinator.wait_for(lambda: len(r.seen("/o")) == 31, what="20 more")
            time.sleep(0.5)
            assert len(r.seen("/o")) == 31, "the 10 conversions from before were not enqueued again"
            one = conn.execute("SELECT d.id FROM postback.deliveries d JOIN postback.conversions c "
                               "ON c.click_id = d.click_id AND c.id = d.conversion_id "
                               "WHERE c.transaction_id = 'post-3'").fetchone()[0]
            coordinator.wait_for(lambda: conn.execute("SELECT state FROM postback.deliveries WHERE id = %s",
                                                      (one,)).fetchone()[0] == "succeeded", what="post-3 recorded")
            assert conn.execute("SELECT postback.retry(%s)", (one,)).fetchone()[0] == one
            coordinator.wait_for(lambda: len(r.seen("/o")) == 32, what="the retry")
            explained = conn.execute("SELECT fired, announced, states FROM postback.explain('post-3')").fetchone()
            assert explained[0] is True and explained[1] == ["approved"]
            assert "tx=post-3" in conn.execute("SELECT postback.curl(%s)", (one,)).fetchone()[0]
            conn.execute("SELECT postback.pause('net')")
            assert conn.execute("SELECT postback.replay('net', now() - interval '1 hour')").fetchone()[0] == 30
            time.sleep(1)
            assert len(r.seen("/o")) == 32, "paused: nothing sent"
            assert conn.execute("SELECT held_by FROM postback.endpoint_health").fetchone()[0].startswith("paused")
            # an edit while they are queued: each node renders its shards' queued postbacks again
            conn.execute("UPDATE postback.endpoints SET url_template = url_template || '&edited=1' WHERE name = 'net'")
            conn.execute("SELECT postback.resume('net')")
            coordinator.wait_for(lambda: len(r.seen("/o")) == 62, what="the replay after resume")
            replayed = r.seen("/o")[32:]
            assert all(g["query"].get("edited") == "1" for g in replayed), \
                [g["path"] for g in replayed if g["query"].get("edited") != "1"]
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('k1', 'after-edit')")
            coordinator.wait_for(lambda: any(g["query"].get("edited") == "1" for g in r.seen("/o")),
                                 what="the edited endpoint's request")
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.execute("DELETE FROM postback.conversions WHERE transaction_id = 'post-5'")
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.execute("DELETE FROM postback.endpoints WHERE name = 'net'")
            for view in ["delivery_summary", "match_rate", "endpoint_health", "metrics", "dead_letters",
                         "conversion_duplicates", "watches"]:
                conn.execute(f"SELECT * FROM postback.{view}").fetchall()
            assert conn.execute("SELECT deliveries_finished FROM postback.metrics "
                                "WHERE period = 'all' AND breakdown = 'total'").fetchone()[0] >= 31
            nodes = conn.execute("SELECT node, role, state FROM postback.cluster_worker_status() "
                                 "WHERE role = 'delivery'").fetchall()
            assert {n for n, _, _ in nodes} == {f"127.0.0.1:{n.port}" for n in [coordinator] + workers}, nodes
            assert all(s.startswith("delivering:") and s.endswith("Citus shards of postback.deliveries on this node")
                       for _, _, s in nodes), nodes
            coordinator.wait_for(lambda: conn.execute(
                "SELECT count(*) FROM postback.deliveries WHERE state <> 'succeeded'").fetchone()[0] == 0,
                what="all recorded")
            # the coordinator's maintenance worker rolls up and purges through Citus: its
            # roll-up, over deliveries and attempts moved an hour back
            # (Citus evaluates now() on the coordinator; a STABLE expression over a column it refuses)
            conn.execute("UPDATE postback.deliveries SET completed_at = now() - interval '1 hour' "
                         "WHERE completed_at IS NOT NULL")
            conn.execute("UPDATE postback.attempts SET started_at = now() - interval '1 hour'")
            conn.execute("UPDATE postback.rollup_state SET rolled_until = now() - interval '3 hours', "
                         "attempts_until = now() - interval '3 hours'")
            conn.execute("TRUNCATE postback.delivery_rollup, postback.attempt_rollup")
            while conn.execute("SELECT postback.roll_up()").fetchone()[0]:
                pass
            # (the test request has no conversion: not counted, as on one node)
            assert conn.execute("SELECT sum(succeeded) FROM postback.delivery_rollup").fetchone()[0] == 31
            assert conn.execute("SELECT sum(attempts) FROM postback.attempt_rollup").fetchone()[0] == \
                conn.execute("SELECT count(*) FROM postback.attempts WHERE status_code IS NOT NULL").fetchone()[0]
            states = "SELECT node, state || coalesce(' / ' || last_error, '') FROM postback.cluster_worker_status() " \
                     "WHERE role = 'maintenance'"
            # (each looks again every 5 s)
            coordinator.wait_for(lambda: all("Citus" in v or "coordinator" in v
                                             for v in dict(conn.execute(states)).values()),
                                 what="the maintenance workers seeing the tables distributed")
            maintenance = dict(conn.execute(states))
            assert maintenance[f"127.0.0.1:{coordinator.port}"].startswith(
                "maintaining the Citus cluster: roll-up every minute, purge every hour"), maintenance
            for w in workers:
                assert maintenance[f"127.0.0.1:{w.port}"] == (
                    "maintaining: auto-disable of the endpoints this node's deliveries found failing "
                    "(the coordinator rolls up and purges)"), maintenance
            assert conn.execute("SELECT postback.purge(interval '0')").fetchone()[0] == 32
            assert conn.execute("SELECT count(*) FROM postback.attempts").fetchone()[0] == 0, \
                "the purged deliveries' attempts went with them (in the shard beside each)"
        # an update whose script knows nothing of shards is refused before it starts, on every node
        sharedir = subprocess.check_output([PG_CONFIG, "--sharedir"]).decode().strip()
        script = os.path.join(sharedir, "extension", "pg_postback--0.3.0--0.3.0-citus-test.sql")
        with open(script, "w") as f:
            f.write("CREATE TABLE postback.would_miss_the_shards ();\n")
        try:
            with coordinator.connect() as conn:
                with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
                    conn.execute("ALTER EXTENSION pg_postback UPDATE TO '0.3.0-citus-test'")
                assert "distributed by Citus" in str(e.value) and "allow_distributed_update" in e.value.diag.message_hint
            for n in [coordinator] + workers:
                with n.connect() as conn:
                    assert conn.execute("SELECT extversion, to_regclass('postback.would_miss_the_shards') "
                                        "FROM pg_extension WHERE extname = 'pg_postback'").fetchone() == ("0.3.0", None)
        finally:
            os.unlink(script)
    finally:
        r.stop()


def test_distributed_each_node_deactivates_the_endpoints_its_deliveries_find_failing(citus_fresh):
    """endpoint_state is each node's own; a node's maintenance worker deactivates the
    endpoints failing there longer than postback.disable_after, in the endpoints reference
    table, so every node stops claiming for them."""
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'",
                                       every_node={"postback.disable_after": "'2s'",
                                                   "postback.breaker_failures": "0"})
    distribute(coordinator)
    wait_for_shards([coordinator] + workers)
    with coordinator.connect() as conn:
        conn.execute("INSERT INTO postback.endpoints (name, url_template, retry_schedule, max_attempts) "
                     "VALUES ('gone', 'http://127.0.0.1:9/gone?tx={transaction_id}', '{200 ms}', 100)")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                     "SELECT 'k' || g, 'f-' || g FROM generate_series(1, 20) g")
        coordinator.wait_for(lambda: conn.execute(
            "SELECT NOT active FROM postback.endpoints WHERE name = 'gone'").fetchone()[0],
            timeout=30, what="the failing endpoint deactivated")
        assert conn.execute("SELECT count(*) FROM postback.deliveries WHERE state = 'pending'").fetchone()[0] == 20
        # endpoint_health on the coordinator (whose own endpoint_state is empty) merges the nodes'
        failures, since, error, held = conn.execute(
            "SELECT consecutive_failures, failing_since, last_error, held_by FROM postback.endpoint_health "
            "WHERE endpoint = 'gone'").fetchone()
        assert failures >= 1 and since is not None and "refused" in error and held.startswith("inactive"), \
            (failures, since, error, held)
        assert conn.execute("SELECT count(*) FROM postback.endpoint_state").fetchone()[0] == 0
    # each node found it failing; the one that got there first deactivated it for all
    failing = []
    for w in workers:
        with w.connect() as conn:
            failing.append(conn.execute("SELECT count(*) FROM postback.endpoint_state "
                                        "WHERE failing_since IS NOT NULL").fetchone()[0])
            assert conn.execute("SELECT active FROM postback.endpoints WHERE name = 'gone'").fetchone()[0] is False
    assert failing == [1, 1], failing


def test_distributed_20000_conversions_each_delivered_once_by_the_node_holding_it(citus_fresh):
    """20,000 conversions through the coordinator (single-row INSERTs, multi-row INSERTs,
    COPY, INSERT … SELECT), then 2,000 of them reversed: each status delivered exactly
    once, approved before reversed, by the node whose shard holds it (each node's
    attempts are its worker's sends); ids and idempotency keys unique across nodes."""
    coordinator, workers = citus_fresh(workers_preload="'citus,pg_postback'")
    distribute(coordinator)
    wait_for_shards([coordinator] + workers)
    r = Receiver().start()
    try:
        with coordinator.connect() as conn:
            conn.execute("INSERT INTO postback.endpoints (name, url_template, max_in_flight) VALUES ('net', %s, 32)",
                         (r.url("/t?tx={transaction_id}&st={status}"),))
            conn.execute("INSERT INTO postback.clicks (click_id) SELECT 'k' || g FROM generate_series(1, 20000) g")
            started = time.monotonic()
            for g in range(1, 1001):
                conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES (%s, %s)",
                             (f"k{g}", f"t-{g}"))
            for first in range(1001, 10001, 500):
                conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES "
                             + ", ".join(f"('k{g}', 't-{g}')" for g in range(first, first + 500)))
            with conn.cursor().copy("COPY postback.conversions (click_id, transaction_id) FROM STDIN") as copy:
                for g in range(10001, 15001):
                    copy.write_row((f"k{g}", f"t-{g}"))
            conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) "
                         "SELECT k.click_id, 't-' || substr(k.click_id, 2) FROM postback.clicks k "
                         "WHERE substr(k.click_id, 2)::int > 15000")
            written = time.monotonic() - started
            conn.execute("UPDATE postback.conversions SET status = 'reversed' "
                         "WHERE click_id = ANY (SELECT 'k' || g FROM generate_series(1, 20000, 10) g)")

            def finished():
                return conn.execute("SELECT count(*) FILTER (WHERE state = 'succeeded'), count(*) "
                                    "FROM postback.deliveries").fetchone()
            coordinator.wait_for(lambda: finished() == (22000, 22000), timeout=300, interval=0.5,
                                 what=lambda: f"22,000 deliveries succeeded (now {finished()})")
            elapsed = time.monotonic() - started
            assert conn.execute("SELECT count(DISTINCT id), count(DISTINCT idempotency_key) FROM postback.deliveries"
                                ).fetchone() == (22000, 22000)
            assert conn.execute("SELECT count(DISTINCT id) FROM postback.conversions").fetchone()[0] == 20000
            attempts, distinct = conn.execute("SELECT count(*), count(DISTINCT id) FROM postback.attempts").fetchone()
            assert attempts == distinct >= 22000
            # every attempt recorded: one success per delivery (a failed attempt, retried, is allowed)
            assert conn.execute("SELECT count(*) FROM postback.attempts WHERE outcome = 'succeeded'"
                                ).fetchone()[0] == 22000
            retried = conn.execute("SELECT outcome, error, status_code FROM postback.attempts "
                                   "WHERE outcome <> 'succeeded'").fetchall()
        seen = r.seen("/t")
        sent = [g["query"]["tx"] + ":" + g["query"]["st"] for g in seen]
        if len(sent) != len(set(sent)):
            for n in [coordinator] + workers:
                print(n.port, "\n".join(l for l in n.log().splitlines() if "WARNING" in l or "ERROR" in l or "LOG" in l)[-3000:])
        assert len(sent) == len(set(sent)) == 22000, "each status exactly once"
        order = {}
        for s in sent:
            tx, st = s.split(":")
            order.setdefault(tx, []).append(st)
        reversed_ones = [tx for tx, sts in order.items() if "reversed" in sts]
        assert len(reversed_ones) == 2000 and all(order[tx] == ["approved", "reversed"] for tx in reversed_ones)
        per_node = []
        for n in [coordinator] + workers:
            with n.connect() as conn:
                held = sum(conn.execute(f"SELECT count(*) FROM postback.deliveries_{d}").fetchone()[0]
                           for d in local_shards(conn, "postback.deliveries"))
                sent_here = conn.execute("SELECT coalesce(sum(sent), 0) FROM postback.worker_status() "
                                         "WHERE role = 'delivery'").fetchone()[0]
                assert sent_here == held, (n.port, sent_here, held)
                per_node.append(held)
        assert per_node[0] == 0 and all(p > 0 for p in per_node[1:]) and sum(per_node) == 22000, per_node
        print(f"\n20,000 conversions written through the coordinator in {written:.1f} s; 22,000 deliveries "
              f"(2,000 reversals) in {elapsed:.1f} s: {22000 / elapsed:.0f}/s in total; per node "
              + ", ".join(f"{p} ({p / elapsed:.0f}/s)" for p in per_node)
              + f" (coordinator, worker 1, worker 2; one 2-core machine: correctness, not speed); "
              f"attempts retried: {retried}")
    finally:
        r.stop()


@pytest.fixture
def made_extra():
    made = []
    yield made
    for n in made:
        n.destroy()
