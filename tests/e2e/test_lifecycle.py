"""Status changes cost the same whatever the history: the predecessor of a lifecycle
delivery is an index probe on (conversion_id, endpoint_id), never a scan."""

import json

from helpers import scoped_endpoint


def plans_of_the_enqueue(conn, statement):
    """The plans auto_explain reports for the statements the triggers run."""
    plans = []
    conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET auto_explain.log_analyze = on")
    conn.execute("SET auto_explain.log_format = 'json'")
    conn.execute("SET auto_explain.log_level = 'notice'")
    conn.execute(statement)
    conn.execute("SET auto_explain.log_min_duration = -1")
    return [p for p in plans if "INSERT INTO postback.deliveries" in p]


def test_the_predecessor_lookup_is_an_index_probe_on_the_conversion_with_a_long_history(cluster):
    with cluster.connect() as conn:
        name = scoped_endpoint(conn, "http://127.0.0.1:9/lc?c={click_id}", "lc")
        eid = conn.execute("SELECT id FROM postback.endpoints WHERE name = %s", (name,)).fetchone()[0]
        conn.execute("SELECT postback.pause(%s)", (name,))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, status) "
                     "SELECT 'c', 'lc-' || g, %s, 'pending' FROM generate_series(1, 20) g", (name,))
        # a long history after them: 100k finished deliveries of other conversions
        conn.execute(
            "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, "
            "                                 state, completed_at) "
            "SELECT %s, 1000000000 + g, 'x', 'approved', 'hist.' || g, 'GET', 'http://127.0.0.1:9/', 'succeeded', now() "
            "FROM generate_series(1, 100000) g", (eid,))
        conn.execute("ANALYZE postback.deliveries")
        plans = plans_of_the_enqueue(
            conn, f"UPDATE postback.conversions SET status = 'approved' WHERE event = '{name}'")
        assert plans, "auto_explain reported no plan of the enqueue INSERT"
        text = plans[-1]
        plan = json.loads(text[text.index("{"):])
        nodes = []

        def walk(node):
            nodes.append(node)
            for child in node.get("Plans", []):
                walk(child)
        walk(plan["Plan"])
        probes = [n for n in nodes if n.get("Index Name") == "deliveries_conversion"]
        assert probes and all("conversion_id" in n.get("Index Cond", "") for n in probes), text
        assert not any(n.get("Index Name") == "deliveries_pkey" and n.get("Scan Direction") == "Backward"
                       for n in nodes), text
        # each probe reads a handful of rows, not the history
        assert all(n.get("Rows Removed by Filter", 0) == 0 for n in nodes), text
        made = conn.execute(
            "SELECT count(*), count(predecessor_id) FROM postback.deliveries d JOIN postback.conversions c "
            "ON c.id = d.conversion_id WHERE c.event = %s AND d.endpoint_id = %s AND d.status = 'approved'",
            (name, eid)).fetchone()
        assert made == (20, 20), made
        conn.execute("DELETE FROM postback.deliveries WHERE idempotency_key LIKE 'hist.%'")
