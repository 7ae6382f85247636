"""The README's SQL examples run as written, top to bottom, in one fresh database."""

import os
import re
import subprocess

from cluster import PG_BIN

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def sql_blocks():
    with open(README) as f:
        return re.findall(r"```sql\n(.*?)```", f.read(), re.S)


def test_every_sql_example_of_the_readme_runs_top_to_bottom(make_cluster, tmp_path):
    # the examples name partners' real-looking hosts: a worker serving another
    # database sends nothing (and resolves no name) while they run
    c = make_cluster(settings={"postback.database_name": "'somewhere_else'"})
    with c.connect() as conn:
        conn.execute("CREATE DATABASE readme")
    with c.connect("readme") as conn:
        conn.execute("CREATE EXTENSION pg_postback")
    blocks = sql_blocks()
    assert len(blocks) >= 6
    for n, block in enumerate(blocks):
        script = tmp_path / f"block{n}.sql"
        script.write_text(block)
        out = subprocess.run(
            [f"{PG_BIN}/psql", "-X", "-v", "ON_ERROR_STOP=1", "-q", "-d", c.dsn("readme"), "-f", str(script)],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"README SQL block {n} failed:\n{block}\n{out.stderr}"
    with c.connect("readme") as conn:
        # what the examples promise: network-a got order-1001 by its click's partner,
        # the global endpoints too, network-b not
        rows = dict(conn.execute("SELECT endpoint, reason FROM postback.explain('order-1001')").fetchall())
        assert sorted(e for e, r in rows.items() if r == "fired") == ["crm", "network-a", "network-x", "partner"]
        assert rows["network-b"] == 'not fired: partner "network-a" is not in partners {network-b}'

        routed = conn.execute(
            "SELECT routed FROM postback.preview('network-a', "
            "(SELECT id FROM postback.conversions WHERE transaction_id = 'order-1001'))").fetchone()[0]
        assert routed is True
