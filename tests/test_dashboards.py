"""Monitoring (deploy/prometheus, deploy/grafana): every PromQL expression names only metrics the
code exports (host/metric_names.py), the dashboard covers each part of the service, the alert
rules carry what Alertmanager and Grafana need, and the scrape and provisioning configs agree with
docker-compose.yml. `promtool` checks the configs and the PromQL syntax where it is installed
(Debian: `apt-get install prometheus`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from host import metric_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

HISTOGRAMS = {
    "localmoe_http_request_duration_seconds",
    "localmoe_time_to_first_token_seconds",
    "localmoe_inter_token_latency_seconds",
    "localmoe_e2e_request_latency_seconds",
    "localmoe_request_queue_time_seconds",
    "localmoe_batch_size",
}
# Series that are not LocalMoE's: Prometheus' own per target, and Flower's (its own exporter's names).
OTHER_METRICS = {"up", "flower_events_total", "flower_worker_online", "flower_task_runtime_seconds"}
EXPORTED = set(metric_names.ALL) | OTHER_METRICS

# PromQL words that look like identifiers and are not metrics.
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}  # fmt: skip
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "atan2", "inf", "nan",
}  # fmt: skip
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def strip_promql(expr: str) -> str:
    """The expression without strings, label matchers, label lists, ranges and Grafana variables:
    what is left of its identifiers are metric names, functions and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = LABEL_LISTS.sub(" ", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", " ", expr)
    return re.sub(r"\b\d[\w.]*", " ", expr)  # numbers, durations (5m), 1e3


def metrics_in(expr: str) -> set[str]:
    """Every metric name a PromQL expression reads. Grafana's label_values(metric, label) counts
    its metric; a histogram's _bucket/_sum/_count series count as the histogram."""
    m = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*\w+\s*\)\s*", expr)
    if m:
        return metrics_in(m.group(1)) if m.group(1) else set()
    found = set()
    stripped = strip_promql(expr)
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        name = m.group(0)
        rest = stripped[m.end() :].lstrip()
        if name in KEYWORDS or name in AGGREGATIONS or rest.startswith("("):
            continue  # a keyword, an aggregation or a function call
        found.add(name)
    return {
        re.sub(r"_(?:bucket|sum|count)$", "", n) if n.rsplit("_", 1)[0] in HISTOGRAMS else n for n in found
    }


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels of a collapsed row


def exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS_YML.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    assert len(DASHBOARDS) == 1, DASHBOARDS
    doc: dict[str, Any] = json.loads(DASHBOARDS[0].read_text())
    return doc


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


# --- the metric extractor ------------------------------------------------------------------------


def test_metrics_in() -> None:
    assert metrics_in(
        'histogram_quantile(0.99, sum by (le, worker) (rate(localmoe_batch_size_bucket{worker=~"$worker"}'
        "[$__rate_interval])))"
    ) == {"localmoe_batch_size"}
    assert metrics_in(
        'sum by (layer, expert) (increase(a_total{modality=~"$modality", x="y(z)"}[$__range]))'
        " / ignoring (expert) group_left sum by (layer) (rate(b_total[5m] offset 1h))"
    ) == {"a_total", "b_total"}
    assert metrics_in('up{job="w"} == 0 and on (instance) c > 1e3 unless d') == {"up", "c", "d"}
    assert metrics_in("max(deriv(x[10m])) > 0 and max(max_over_time(y[6h:1m])) < bool 3") == {"x", "y"}
    assert metrics_in("label_values(localmoe_engine_info, worker)") == {"localmoe_engine_info"}
    assert metrics_in("label_values(worker)") == set()
    assert metrics_in("topk(5, foo_sum / foo_count)") == {"foo_sum", "foo_count"}  # not a known histogram


# --- metric names --------------------------------------------------------------------------------


def test_dashboard_uses_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    used: dict[str, set[str]] = {}
    for panel in panels(dashboard):
        for expr in exprs(panel):
            for name in metrics_in(expr):
                used.setdefault(name, set()).add(panel["title"])
    for query in variable_queries(dashboard):
        for name in metrics_in(query):
            used.setdefault(name, set()).add("variables")
    unknown = {name: sorted(titles) for name, titles in used.items() if name not in EXPORTED}
    assert not unknown, f"metrics no process exports: {unknown}"
    assert len(used) >= 25, sorted(used)


def test_alert_rules_use_only_exported_metrics() -> None:
    for rule in alert_rules():
        unknown = metrics_in(rule["expr"]) - EXPORTED
        assert not unknown, f"{rule['alert']}: {unknown}"


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    used = {name for panel in panels(dashboard) for expr in exprs(panel) for name in metrics_in(expr)}
    assert set(metric_names.ALL) <= used, sorted(set(metric_names.ALL) - used)


# --- the dashboard -------------------------------------------------------------------------------


def section_exprs(dashboard: dict[str, Any]) -> dict[str, list[tuple[dict[str, Any], str]]]:
    """Row title (lower case) -> (panel, expr) of the panels under that row."""
    out: dict[str, list[tuple[dict[str, Any], str]]] = {}
    row = ""
    for panel in panels(dashboard):
        if panel["type"] == "row":
            row = panel["title"].lower()
            continue
        out.setdefault(row, []).extend((panel, e) for e in exprs(panel))
    return out


def section(dashboard: dict[str, Any], word: str) -> list[tuple[dict[str, Any], str]]:
    rows = [title for title in section_exprs(dashboard) if word in title]
    assert len(rows) == 1, f"one row about {word!r}, got {rows}"
    return section_exprs(dashboard)[rows[0]]


def test_dashboard_covers_throughput(dashboard: dict[str, Any]) -> None:
    found = {n for _, e in section(dashboard, "throughput") if "rate(" in e for n in metrics_in(e)}
    assert {"localmoe_generation_tokens_total", "localmoe_jobs_submitted_total"} <= found, found


def test_dashboard_covers_latency_percentiles(dashboard: dict[str, Any]) -> None:
    quantiles: dict[str, set[str]] = {}
    for _, e in section(dashboard, "latency"):
        for m in re.finditer(r"histogram_quantile\((0\.\d+),.*?\b(\w+)_bucket\b", e):
            quantiles.setdefault(m.group(2), set()).add(m.group(1))
            assert re.search(r"by \([^)]*\ble\b", e), f"the quantile needs le kept: {e}"
    for name in (
        "localmoe_time_to_first_token_seconds",
        "localmoe_inter_token_latency_seconds",
        "localmoe_e2e_request_latency_seconds",
        "localmoe_request_queue_time_seconds",
    ):
        assert {"0.5", "0.99"} <= quantiles.get(name, set()), (
            f"{name}: p50 and p99, got {quantiles.get(name)}"
        )


def test_dashboard_covers_queues(dashboard: dict[str, Any]) -> None:
    used = section(dashboard, "queue")
    found = {n for _, e in used for n in metrics_in(e)}
    assert {"localmoe_queue_depth", "localmoe_backlog_jobs", "localmoe_backlog_tokens"} <= found, found
    assert any(re.search(r"by \(queue\)", e) for _, e in used), "depth per queue"
    # the API's queue gauges are read from the shared Redis: every replica reports the same value
    for _, e in used:
        if metrics_in(e) & {"localmoe_queue_depth", "localmoe_backlog_jobs", "localmoe_backlog_tokens"}:
            assert not re.match(r"\s*sum\b", e), f"summing the replicas double-counts: {e}"


def test_dashboard_has_an_expert_heat_map(dashboard: dict[str, Any]) -> None:
    expert = [
        (p, e) for p, e in section(dashboard, "expert") if "localmoe_expert_tokens_total" in metrics_in(e)
    ]
    kinds = {p["type"] for p, _ in expert}
    assert kinds & {"heatmap", "table"}, kinds
    for panel, e in expert:
        assert re.search(r"by \([^)]*\blayer\b", e) or 'layer="$layer"' in e, e
        assert re.search(r"by \([^)]*\bexpert\b", e), f"{panel['title']}: per expert"
        assert 'modality=~"$modality"' in e, f"{panel['title']}: the modality variable"
    tables = [p for p, _ in expert if p["type"] == "table"]
    for table in tables:  # layer × expert: rows are layers, columns experts
        matrix = [t for t in table.get("transformations", []) if t["id"] == "groupingToMatrix"]
        assert matrix and {matrix[0]["options"]["rowField"], matrix[0]["options"]["columnField"]} == {
            "layer",
            "expert",
        }


def test_dashboard_covers_gpu_health(dashboard: dict[str, Any]) -> None:
    found = {n for _, e in section(dashboard, "gpu") for n in metrics_in(e)}
    assert set(metric_names.WORKER_GPU) <= found, sorted(set(metric_names.WORKER_GPU) - found)


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "worker", "modality"} <= set(variables)
    assert variables["worker"]["multi"] and variables["worker"]["includeAll"]
    assert variables["worker"]["allValue"] == ".*"
    assert variables["modality"]["includeAll"]
    # every panel that reads a worker's series is filtered by the worker variable
    worker_metrics = set(metric_names.WORKER) | set(metric_names.WORKER_GPU)
    for panel in panels(dashboard):
        for e in exprs(panel):
            for m in re.finditer(r"\b([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", e):
                name = re.sub(r"_(?:bucket|sum|count)$", "", m.group(1))
                if name in worker_metrics:
                    assert 'worker=~"$worker"' in (m.group(2) or ""), f"{panel['title']}: {m.group(0)}"


def test_dashboard_panels_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert exprs(panel), f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


# --- alert rules ---------------------------------------------------------------------------------


def test_alerts_have_severity_and_annotations() -> None:
    names = []
    for rule in alert_rules():
        assert "alert" in rule, f"only alerts in alerts.yml: {rule}"
        names.append(rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    assert len(names) == len(set(names)), "alert names must be unique"


def rule_matching(pattern: str) -> dict[str, Any]:
    found = [r for r in alert_rules() if re.search(pattern, " ".join(r["expr"].split()))]
    assert found, f"no alert whose expression matches {pattern!r}"
    return found[0]


def test_the_alerts_the_operators_need(prometheus: dict[str, Any]) -> None:
    worker_job = next(j["job_name"] for j in prometheus["scrape_configs"] if "worker" in j["job_name"])
    assert rule_matching(rf'up\{{job="{worker_job}"\}} == 0').get("for")
    assert rule_matching(r'localmoe_workers\{state="ready"\}')
    backlog = rule_matching(r"deriv\(localmoe_backlog_jobs\[")
    assert "and" in backlog["expr"] and backlog.get("for"), "growing and large, for a while"
    assert rule_matching(r"localmoe_queue_depth\) > \d+").get("for") == "10m"
    hot = rule_matching(r"localmoe_gpu_temperature_celsius > 85")
    assert hot.get("for") == "5m"
    errors = rule_matching(
        r'localmoe_http_requests_total\{status=~"5\.\."\}.*/.*localmoe_http_requests_total.*> 0\.01'
    )
    assert errors.get("for") == "5m"
    assert rule_matching(r'localmoe_request_success_total\{finish_reason="error"\}.*/.*> 0\.01')
    assert rule_matching(r"increase\(localmoe_engine_failovers_total\[10m\]\) > 0")
    # every job an up{job=...} alert names is scraped
    jobs = {j["job_name"] for j in prometheus["scrape_configs"]}
    for rule in alert_rules():
        for job in re.findall(r'up\{job="([^"]+)"\}', rule["expr"]):
            assert job in jobs, f"{rule['alert']}: no scrape job {job}"


# --- prometheus.yml against docker-compose.yml ---------------------------------------------------


def scrape_job(prometheus: dict[str, Any], name: str) -> dict[str, Any]:
    jobs = [j for j in prometheus["scrape_configs"] if j["job_name"] == name]
    assert len(jobs) == 1, name
    return jobs[0]


def targets(job: dict[str, Any]) -> list[str]:
    return [t for sc in job.get("static_configs", []) for t in sc["targets"]]


def secret_paths(compose: dict[str, Any]) -> set[str]:
    """Where compose mounts the prometheus service's secrets."""
    out = set()
    for secret in compose["services"]["prometheus"].get("secrets", []):
        if isinstance(secret, str):
            out.add(f"/run/secrets/{secret}")
        else:
            out.add(secret.get("target", f"/run/secrets/{secret['source']}"))
    return out


def test_prometheus_loads_the_alert_rules(prometheus: dict[str, Any]) -> None:
    files = [PROMETHEUS_YML.parent / f for f in prometheus["rule_files"]]
    assert ALERTS_YML in files


def test_prometheus_scrapes_the_api_replicas_directly(
    prometheus: dict[str, Any], compose: dict[str, Any]
) -> None:
    api = scrape_job(prometheus, "localmoe-api")
    replicas = sorted(name for name in compose["services"] if re.fullmatch(r"api-\d+", name))
    assert replicas == ["api-1", "api-2"]
    assert targets(api) == [f"{name}:8000" for name in replicas], "each replica, not nginx"
    auth = api["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth, "the key only from a file"
    assert auth["credentials_file"] in secret_paths(compose)


def test_prometheus_scrapes_every_worker(prometheus: dict[str, Any], compose: dict[str, Any]) -> None:
    job = scrape_job(prometheus, "localmoe-worker")
    workers = {name for name in compose["services"] if name.startswith("worker")}
    assert len(workers) == 4
    for name in workers:
        svc = compose["services"][name]
        port = svc["environment"]["LOCALMOE_METRICS__WORKER_PORT"]
        assert svc["environment"]["LOCALMOE_METRICS__HOST"] == "0.0.0.0", f"{name}: reachable from Prometheus"
        assert port in [str(p) for p in svc.get("expose", [])], name
        gpu = name.removeprefix("worker-")
        configs = [sc for sc in job["static_configs"] if f"{name}:{port}" in sc["targets"]]
        assert len(configs) == 1, f"{name} is not scraped"
        assert configs[0].get("labels", {}).get("worker") == gpu, f"{name}: worker label {gpu}"
    assert job.get("honor_labels") is True, "the exporters set their own worker label"
    assert any(f.startswith("/etc/prometheus/targets/") for sd in job["file_sd_configs"] for f in sd["files"])


def test_prometheus_scrapes_webhooks_and_flower(prometheus: dict[str, Any], compose: dict[str, Any]) -> None:
    webhooks = compose["services"]["webhooks"]
    port = webhooks["environment"]["LOCALMOE_METRICS__WEBHOOK_PORT"]
    assert targets(scrape_job(prometheus, "localmoe-webhooks")) == [f"webhooks:{port}"]
    assert webhooks["environment"]["LOCALMOE_METRICS__HOST"] == "0.0.0.0"
    flower = scrape_job(prometheus, "flower")
    assert targets(flower) == ["flower:5555"]
    auth = flower["basic_auth"]
    assert "password" not in auth and auth["password_file"] in secret_paths(compose)
    basic_auth = compose["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    user = re.match(r"\$\{FLOWER_USER:-([^}]+)\}:|([^:$]+):", basic_auth)
    assert user and auth["username"] in user.groups(), "Flower's user, FLOWER_USER's default"


def test_prometheus_config_mount(compose: dict[str, Any]) -> None:
    svc = compose["services"]["prometheus"]
    command = " ".join(svc["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    binds = [v for v in svc["volumes"] if isinstance(v, dict) and v.get("target") == "/etc/prometheus"]
    assert len(binds) == 1 and binds[0]["read_only"] is True
    assert (ROOT / binds[0]["source"]).resolve() == PROMETHEUS_YML.parent


# --- grafana provisioning ------------------------------------------------------------------------


def test_grafana_provisioning(compose: dict[str, Any], dashboard: dict[str, Any]) -> None:
    svc = compose["services"]["grafana"]
    binds = {v["target"]: v for v in svc["volumes"] if isinstance(v, dict)}
    provisioning = binds["/etc/grafana/provisioning"]
    assert provisioning["read_only"] is True
    assert (ROOT / provisioning["source"]).resolve() == GRAFANA / "provisioning"

    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "localmoe.yml").read_text())
    (provider,) = providers["providers"]
    path = provider["options"]["path"]
    assert path in binds and binds[path]["read_only"] is True
    assert (ROOT / binds[path]["source"]).resolve() == GRAFANA / "dashboards"

    datasource = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert datasource["query"] == "prometheus" and datasource["current"]["value"] == source["uid"]


# --- promtool, where installed -------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=30)


@needs_promtool
def test_promtool_check_rules() -> None:
    run = promtool("check", "rules", str(ALERTS_YML))
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_check_config(tmp_path: Path, compose: dict[str, Any]) -> None:
    """The config as the container sees it: its secret files are made, under tmp_path."""
    text = PROMETHEUS_YML.read_text()
    for path in secret_paths(compose):
        secret = tmp_path / "secrets" / Path(path).name
        secret.parent.mkdir(exist_ok=True)
        secret.write_text("dummy\n")
        text = text.replace(path, str(secret))
    text = text.replace("/etc/prometheus/", f"{tmp_path}/")
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(ALERTS_YML, tmp_path / "alerts.yml")
    run = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path, dashboard: dict[str, Any]) -> None:
    """Each panel query, with Grafana's variables given values, as a recording rule."""
    values = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
    rules = []
    for i, e in enumerate(e for p in panels(dashboard) for e in exprs(p)):
        for var, value in values.items():
            e = e.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": re.sub(r"\$\{?\w+\}?", "0", e)})
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = promtool("check", "rules", str(tmp_path / "queries.yml"))
    assert run.returncode == 0, run.stdout + run.stderr
