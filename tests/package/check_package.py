"""Run by scripts/package-test.sh after `dpkg -i`, with no cargo on the PATH: what a DBA
does with the package. Exits non-zero on the first thing that does not hold."""

import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
from cluster import Cluster  # noqa: E402
from receiver import Receiver  # noqa: E402

assert shutil.which("cargo") is None, "cargo is on the PATH: this test must run without a Rust toolchain"
r = Receiver().start()
c = Cluster.create(settings={"postback.database_name": "'postgres, old'"})
try:
    c.start()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_postback'").fetchone()[0]
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', %s)",
                     (r.url("/pb?tx={transaction_id}"),))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('k1', 'pkg-1')")
        c.wait_for(lambda: len(r.seen("/pb")) == 1, what="a delivery from the packaged extension")
        print(f"CREATE EXTENSION pg_postback ({version}): delivered {r.seen('/pb')[0]['query']}")
        # a table the application has, watched: its insert is delivered too
        conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, click text NOT NULL, total numeric)")
        conn.execute("""SELECT postback.watch('public.orders', '{"click_id": "click", "transaction_id": "''order-'' || id", "amount": "total"}')""")
        conn.execute("INSERT INTO public.orders VALUES (7, 'k7', 19.90)")
        c.wait_for(lambda: len(r.seen("/pb")) == 2, what="a delivery of a watched table's row")
        assert r.seen("/pb")[1]["query"]["tx"] == "order-7", r.seen("/pb")
        print("postback.watch: the watched order was delivered")
        conn.execute("CREATE DATABASE old")
    with c.connect("old") as conn:
        conn.execute("CREATE EXTENSION pg_postback VERSION '0.2.0'")
        conn.execute("INSERT INTO postback.endpoints (name, url_template) VALUES ('net', %s)",
                     (r.url("/old?tx={transaction_id}"),))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('k2', 'pkg-old')")
        time.sleep(1)
        assert r.seen("/old") == [], "the worker must wait for the update"
        conn.execute("ALTER EXTENSION pg_postback UPDATE")
        updated = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_postback'").fetchone()[0]
        assert updated == version, (updated, version)
        c.wait_for(lambda: len(r.seen("/old")) == 1, what="the 0.2.0 delivery after ALTER EXTENSION UPDATE")
        print(f"0.2.0 -> {updated}: the queued delivery was sent after the update")
finally:
    c.destroy()
    r.stop()
