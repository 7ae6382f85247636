"""Each conversion reaches the network whose click it was, and no other; global receivers get all."""

import itertools
import json

import pytest

from receiver import Receiver

counter = itertools.count()


@pytest.fixture
def receivers():
    made = [Receiver().start() for _ in range(3)]
    yield made
    for r in made:
        r.stop()


def test_networks_hear_only_of_their_own_conversions(cluster, receivers):
    net_a, net_b, crm = receivers
    tag = f"pt{next(counter)}"
    with cluster.connect() as conn:
        conn.execute(
            "INSERT INTO postback.endpoints (name, url_template, partners) VALUES "
            "(%s, %s, %s), (%s, %s, %s)",
            (f"{tag}-a", net_a.url("/pb?cid={click_id}&s1={click.sub1}&payout={amount}"), [f"{tag}-net-a"],
             f"{tag}-b", net_b.url("/pb?cid={click_id}&aff={click.aff_id}"), [f"{tag}-net-b"]))
        conn.execute("INSERT INTO postback.endpoints (name, kind, url_template, events) VALUES (%s, 'webhook', %s, %s)",
                     (f"{tag}-crm", crm.url("/hook"), [tag]))
        # the landing page records clicks with the sub-ids each network passed
        conn.execute(
            "INSERT INTO postback.clicks (click_id, partner, attributes) "
            "SELECT %s || '-a' || g, %s, jsonb_build_object('sub1', 'kw ' || g || '&x') FROM generate_series(1, 20) g",
            (tag, f"{tag}-net-a"))
        conn.execute(
            "INSERT INTO postback.clicks (click_id, partner, attributes) "
            "SELECT %s || '-b' || g, %s, jsonb_build_object('aff_id', 1000 + g) FROM generate_series(1, 10) g",
            (tag, f"{tag}-net-b"))
        # conversions name only their click; one has no known click
        conn.execute(
            "INSERT INTO postback.conversions (click_id, transaction_id, event, amount) "
            "SELECT click_id, 'tx-' || click_id, %s, 10 FROM postback.clicks WHERE click_id LIKE %s "
            "UNION ALL SELECT %s, %s, %s, 5",
            (tag, f"{tag}-%", f"{tag}-lost", f"tx-{tag}-lost", tag))
        cluster.wait_for(lambda: len(net_a.seen()) == 20 and len(net_b.seen()) == 10 and len(crm.seen()) == 31,
                         what="every partner's postbacks and the global webhooks")
        # a status change follows the partner
        conn.execute("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id = %s",
                     (f"tx-{tag}-b3",))
        cluster.wait_for(lambda: len(net_b.seen()) == 11 and len(crm.seen()) == 32, what="the reversal")
    assert {g["query"]["cid"].split("-")[1][0] for g in net_a.seen()} == {"a"}
    assert {g["query"]["cid"].split("-")[1][0] for g in net_b.seen()} == {"b"}
    by_click = {g["query"]["cid"]: g for g in net_a.seen()}
    first = by_click[f"{tag}-a7"]
    assert first["query"]["s1"] == "kw 7&x" and "s1=kw%207%26x" in first["raw_query"]
    assert sorted(int(g["query"]["aff"]) for g in net_b.seen()) == sorted(list(range(1001, 1011)) + [1003])
    partners = {json.loads(p["body"])["data"].get("partner") for p in crm.seen()}
    assert partners == {f"{tag}-net-a", f"{tag}-net-b", None}
