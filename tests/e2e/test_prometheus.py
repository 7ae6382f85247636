"""Prometheus and Grafana (contrib/): the queries postgres_exporter runs, the alert rules and
the dashboard. The dashboard and the rules use only metrics the queries define; promtool
accepts the rules; and Debian's prometheus-postgres-exporter, started against a real cluster
with the queries file, reports what SQL says (both packages are installed when missing; the
tests that need them skip, saying why, only where apt cannot install them)."""

import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest
import yaml

from cluster import free_port

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
QUERIES = os.path.join(ROOT, "contrib", "prometheus", "queries.yaml")
ALERTS = os.path.join(ROOT, "contrib", "prometheus", "alerts.yaml")
DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "pg_postback.json")
EXPORTER = "/usr/bin/prometheus-postgres-exporter"


def defined_metrics():
    """Metric names queries.yaml defines: <query>_<column> for every column but labels; a
    histogram adds _bucket, _sum and _count."""
    names = set()
    with open(QUERIES) as f:
        for namespace, spec in yaml.safe_load(f).items():
            for column in spec["metrics"]:
                (name, how), = column.items()
                if how["usage"] == "LABEL":
                    continue
                names.add(f"{namespace}_{name}")
                if how["usage"] == "HISTOGRAM":
                    names.update(f"{namespace}_{name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def used_metrics(expr):
    return set(re.findall(r"\bpg_postback_[a-z_]+\b", expr))


def debian_package(binary, package):
    """The binary, installing its Debian package when missing; skips when apt cannot."""
    if not os.path.exists(binary):
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip(f"{binary} is missing and {package} cannot be installed here (needs apt-get as root)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        installed = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                                   env=env, capture_output=True)
        if installed.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            installed = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                                       env=env, capture_output=True)
        if installed.returncode != 0 or not os.path.exists(binary):
            pytest.skip(f"apt-get could not install {package}: {installed.stderr.decode()[-300:]}")
    return binary


def test_the_dashboard_and_the_rules_use_only_metrics_the_queries_define():
    defined = defined_metrics()
    assert {"pg_postback_endpoint_pending", "pg_postback_deliveries_succeeded_total",
            "pg_postback_deliveries_latency_seconds_bucket", "pg_postback_worker_up"} <= defined
    with open(DASHBOARD) as f:
        dashboard = yaml.safe_load(f)  # JSON is YAML
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    with open(ALERTS) as f:
        rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    exprs += [r["expr"] for r in rules]
    for expr in exprs:
        used = used_metrics(expr)
        assert used, expr
        assert used <= defined, f"{expr}: {sorted(used - defined)} not defined in queries.yaml"
    assert {r["alert"] for r in rules} >= {"PgPostbackWorkerDown", "PgPostbackBreakerOpen", "PgPostbackOldestDueDelivery",
                                           "PgPostbackDeadRate", "PgPostbackEndpointDisabled"}


def test_promtool_accepts_the_alert_rules():
    promtool = debian_package("/usr/bin/promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "rules", ALERTS], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout, checked.stdout


def test_every_query_runs_and_reads_no_history(cluster):
    with open(QUERIES) as f:
        queries = yaml.safe_load(f)
    with cluster.connect() as conn:
        for name, spec in queries.items():
            # deliveries and attempts can be read through indexes (partial ones: the queue), never
            # whole: with sequential scans priced out, none is left (tiny test tables aside, the
            # planner prices them so beside a history)
            conn.execute("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + spec["query"]))
            conn.execute("RESET enable_seqscan")
            assert not re.search(r"Seq Scan on (deliveries|attempts)\b", plan), f"{name}:\n{plan}"
            columns = [d.name for d in conn.execute(spec["query"]).description]
            assert columns == [next(iter(c)) for c in spec["metrics"]] + (
                [f"{n}_{s}" for c in spec["metrics"] for n, h in c.items() if h["usage"] == "HISTOGRAM"
                 for s in ("bucket", "sum", "count")]), name


def scrape(port):
    """pg_postback's samples as (name, labels, value); the exporter adds a `server` label."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        m = re.match(r'^(pg_postback_[a-z_]+)(?:\{(.*)\})? (\S+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def value(samples, name, **labels):
    """The one sample of `name` whose labels include `labels`."""
    found = [v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_the_exporter_reports_what_sql_says(make_cluster, receiver):
    binary = debian_package(EXPORTER, "prometheus-postgres-exporter")
    # the breaker off: every 500 is a dead delivery, not a held one
    c = make_cluster({"postback.breaker_failures": "0"})
    receiver.script("/bad", *([{"status": 500}] * 1000))
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_postback")
        conn.execute("CREATE ROLE exporter LOGIN")
        conn.execute("SELECT postback.grant_analyst('exporter')")
        conn.execute("INSERT INTO postback.endpoints (name, url_template, events, partners) VALUES "
                     "('good', %s, '{sale}', '{net-a}')", (receiver.url("/good?c={click_id}"),))
        conn.execute("INSERT INTO postback.endpoints (name, url_template, events, max_attempts) VALUES "
                     "('bad', %s, '{sale}', 1)", (receiver.url("/bad?c={click_id}"),))
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, partner) "
                     "SELECT 'k' || g, 'pm-' || g, 'sale', 'net-a' FROM generate_series(1, 30) g")
        c.wait_for(lambda: conn.execute("SELECT count(*) FROM postback.deliveries WHERE state IN ('succeeded', 'dead')"
                                        ).fetchone()[0] == 60, what="60 finished deliveries")
        conn.execute("SELECT postback.roll_up()")
        conn.execute("SELECT postback.pause('good')")
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event, partner) "
                     "SELECT 'q' || g, 'pq-' || g, 'sale', 'net-a' FROM generate_series(1, 5) g")
        c.wait_for(lambda: conn.execute("SELECT count(*) FROM postback.deliveries WHERE state = 'dead'"
                                        ).fetchone()[0] == 35, what="the bad endpoint's 35 dead deliveries")
        port = free_port()
        env = dict(os.environ, DATA_SOURCE_NAME=f"postgresql://exporter@127.0.0.1:{c.port}/postgres?sslmode=disable")
        exporter = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                                     f"--extend.query-path={QUERIES}"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            values = c.wait_for(lambda: _ready(port), timeout=20, what="the exporter's pg_postback metrics")
            good = {"endpoint": "good", "partner": "net-a"}
            bad = {"endpoint": "bad", "partner": ""}
            assert value(values, "pg_postback_deliveries_succeeded_total", **good) == 30
            assert value(values, "pg_postback_deliveries_dead_total", **bad) == 35
            assert value(values, "pg_postback_deliveries_attempts_total", **bad) == 35
            pending = conn.execute(
                "SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id "
                "WHERE e.name = 'good' AND d.state = 'pending'").fetchone()[0]
            assert value(values, "pg_postback_endpoint_pending", **good) == pending == 5
            assert value(values, "pg_postback_endpoint_paused", **good) == 1
            assert value(values, "pg_postback_endpoint_oldest_due_seconds", **good) > 0
            assert value(values, "pg_postback_endpoint_consecutive_failures", **bad) >= 1
            assert value(values, "pg_postback_deliveries_latency_seconds_count", **good) == 30
            assert value(values, "pg_postback_deliveries_latency_seconds_bucket", le="+Inf", **good) == 30
            assert value(values, "pg_postback_worker_up", role="delivery") == 1
            assert value(values, "pg_postback_worker_waiting_for_update", role="delivery") == 0
        finally:
            exporter.terminate()
            exporter.wait(timeout=10)


def _ready(port):
    try:
        values = scrape(port)
    except OSError:
        return None
    return values if any(n == "pg_postback_deliveries_succeeded_total" for n, _, _ in values) else None
