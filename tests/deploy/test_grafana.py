"""The Grafana dashboard: provisioned from files that compose mounts, every panel's PromQL parses
(promtool), and names only metrics and labels that the live service exports on /metrics."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from tests.deploy.test_stack_files import assert_ok, run, tool

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "genrec.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "genrec.yml"

# Grafana replaces these before a query reaches Prometheus; promtool needs a concrete duration.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "30m"}
# What the dashboard has to show (issue 32): each of these metrics is queried by some panel.
REQUIRED_METRICS = {
    "genrec_requests_total",                    # request rate by status, 429/503
    "genrec_recommendations_total",             # by strategy
    "genrec_stage_duration_seconds_bucket",     # p50/p95/p99 by stage
    "genrec_request_duration_seconds_bucket",   # end to end
    "genrec_batch_size_bucket",                 # batch size distribution
    "genrec_queue_size",                        # queue depth
    "genrec_rejections_total",
    "genrec_degraded_responses_total",
    "genrec_history_store_errors_total",        # Redis errors
    "genrec_model_info",                        # model version
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel["targets"]]


def concrete(expr: str) -> str:
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The genrec_ metric names a query reads (every metric the service exports has the prefix)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(genrec_[a-z0-9_]+)\b", without_strings))


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its {matchers}) for every selector with matchers."""
    return [(metric, set(re.findall(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers)))
            for metric, matchers in re.findall(r"\b(genrec_[a-z0-9_]+)\{([^}]*)\}", expr)]


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in group.split(",")}


# ---------------------------------------------------------------------------------------------
# Provisioning files and compose wiring
# ---------------------------------------------------------------------------------------------


def test_compose_mounts_the_provisioning_and_the_dashboard() -> None:
    proc = run(tool("docker-compose"), "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "--format", "json")
    assert_ok(proc)
    services = json.loads(proc.stdout)["services"]
    grafana = services["grafana"]
    mounts = {v["target"]: v for v in grafana["volumes"]}
    assert Path(mounts["/etc/grafana/provisioning"]["source"]).resolve() == (GRAFANA / "provisioning").resolve()
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    dashboards_mount = mounts[provider["options"]["path"]]
    assert Path(dashboards_mount["source"]).resolve() == DASHBOARD.parent.resolve()
    assert all(v.get("read_only") for v in mounts.values())
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), grafana["image"]
    # The datasource points at the compose Prometheus by service name and its container port.
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    assert any(p["target"] == 9090 for p in services["prometheus"]["ports"])


def test_every_panel_uses_the_provisioned_datasource() -> None:
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    for panel in dashboard()["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    """Each query becomes a recording rule; `promtool check rules` parses every expression."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(panel_queries())
    ]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = run(tool("promtool"), "check", "rules", str(path))
    assert_ok(proc)
    assert f"{len(panel_queries())} rules found" in proc.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """The check above can fail: a query with an unbalanced parenthesis does not pass."""
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "broken", "expr": "sum(rate(genrec_requests_total[1m])"}]}]}))
    assert run(tool("promtool"), "check", "rules", str(path)).returncode != 0


# ---------------------------------------------------------------------------------------------
# Against the live service's /metrics
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path) -> Iterator[dict[str, set[str]]]:
    """{sample name: label names} from the service's /metrics after some traffic (a recommendation,
    an event, a refused request), so every labelled series has a child."""
    settings = Settings(bundle_dir=tiny_bundle, onnx_providers="cpu")
    with TestClient(create_app(settings)) as client:
        items = [json.loads(line)["item_id"] for line in (tiny_bundle / "items.jsonl").read_text().splitlines()[:3]]
        assert client.post("/users/dash-user/events", json={"item_ids": items}).status_code == 200
        assert client.post("/recommend", json={"user_id": "dash-user", "k": 5}).status_code == 200
        assert client.post("/recommend", json={"k": 0}).status_code == 422
        text = client.get("/metrics").text
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        samples.setdefault(family.name, set())
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    yield samples


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(expr) for _, expr in panel_queries()))
    assert REQUIRED_METRICS <= used, f"no panel queries {sorted(REQUIRED_METRICS - used)}"


@pytest.mark.parametrize(("title", "expr"), panel_queries(), ids=[f"{t}:{e[:40]}" for t, e in panel_queries()])
def test_panel_names_only_exported_metrics_and_labels(title: str, expr: str, exported: dict[str, set[str]]) -> None:
    names = metric_names(expr)
    assert names, f"{title}: no genrec_ metric in {expr!r}"
    missing = names - exported.keys()
    assert not missing, f"{title}: the service exports no {sorted(missing)}"
    for metric, labels in selector_labels(expr):
        assert labels <= exported[metric], f"{title}: {metric} has no label(s) {sorted(labels - exported[metric])}"
    available = set().union(*(exported[name] for name in names))
    grouped = grouping_labels(expr)
    assert grouped <= available, f"{title}: grouped by {sorted(grouped - available)}, which no metric of it has"
