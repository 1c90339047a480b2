"""The Helm chart deploy/helm/genrec renders (Helm's own engine, through the helm-python-sdk wheel,
which binds Helm v4's Go SDK: no helm binary is on any package registry we reach), passes
`helm lint --strict`, and every manifest validates against the Kubernetes schemas with
kubernetes-validate (strict: unknown fields fail) at the oldest and newest Kubernetes the chart
supports. Then what the manifests promise: probes, drain timing, settings, selectors, autoscaling."""
from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from service.metrics import ServiceMetrics
from tests.deploy.test_stack_files import assert_ok, run, tool

try:
    import helm_python as helm
except ImportError as error:  # a missing tool fails the run, it never skips it
    raise ImportError("helm-python-sdk is not installed; install it with: pip install -e '.[dev]'") from error

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "deploy" / "helm" / "genrec"
ADAPTER_VALUES = REPO_ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml"
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
UVICORN_CLOSE_S = 5  # service/__main__.py: timeout_graceful_shutdown = drain_timeout_s + 5

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-token-pinned-bundle-fixed-replicas": {
        "gpu": {"enabled": True},
        "adminToken": "s3cret-token",
        "models": {"bundleDir": "/app/models/beauty-tiger/20261123-0400",
                   "volume": {"hostPath": {"path": "/srv/genrec-models", "type": "Directory"}}},
        "autoscaling": {"enabled": False},
        "replicaCount": 3,
        "config": {"GENREC_REDIS_URL": "redis://redis-cluster:6379/0", "GENREC_REDIS_CLUSTER": "true"},
    },
    "existing-secret-no-pdb-queue-metric": {
        "existingSecret": "genrec-admin",
        "podDisruptionBudget": {"enabled": False},
        "autoscaling": {"podsMetric": {"name": "genrec_queue_size", "averageValue": "4"}},
        "shutdown": {"preStopSleepSeconds": 10, "drainSeconds": 30},
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="genrec", namespace="recs")
    return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [doc["kind"] for doc in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in docs}


def merged_values(values: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.merge_values(values)


@pytest.fixture(scope="module", params=list(VALUE_SETS), ids=list(VALUE_SETS))
def case(request: pytest.FixtureRequest) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    values = VALUE_SETS[request.param]
    return merged_values(values), by_kind(render(values))


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


# ---------------------------------------------------------------------------------------------
# Helm and the schemas
# ---------------------------------------------------------------------------------------------


def test_helm_lint_strict_has_no_warnings() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == [], report
    warnings = [m for m in report["messages"] if m["severity"] >= 2]  # Helm: 1 info, 2 warning, 3 error
    assert warnings == [], warnings


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(case, version: str) -> None:
    _, manifests = case
    assert {"Deployment", "Service", "ConfigMap"} <= manifests.keys()
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_validator_rejects_a_wrong_manifest() -> None:
    deployment = by_kind(render({}))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"no": "port"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_default_install_has_every_part() -> None:
    assert set(by_kind(render({}))) == {
        "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"
    }


# ---------------------------------------------------------------------------------------------
# What the manifests promise
# ---------------------------------------------------------------------------------------------


def test_probes_are_readiness_and_liveness(case) -> None:
    _, manifests = case
    c = container(manifests)
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]


def test_termination_grace_covers_prestop_drain_and_close(case) -> None:
    values, manifests = case
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    c = container(manifests)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["sleep", str(values["shutdown"]["preStopSleepSeconds"])]
    drain_s = float(manifests["ConfigMap"]["data"]["GENREC_DRAIN_TIMEOUT_S"])
    assert drain_s == values["shutdown"]["drainSeconds"]
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_s + UVICORN_CLOSE_S


def test_configmap_holds_only_real_settings(case) -> None:
    _, manifests = case
    known = {f"GENREC_{name.upper()}" for name in Settings.model_fields}
    data = manifests["ConfigMap"]["data"]
    assert set(data) <= known, sorted(set(data) - known)
    Settings(**{k.removeprefix("GENREC_").lower(): v for k, v in data.items()})  # every value parses
    c = container(manifests)
    assert c["envFrom"] == [{"configMapRef": {"name": manifests["ConfigMap"]["metadata"]["name"]}}]


def test_models_volume_is_mounted_read_only(case) -> None:
    values, manifests = case
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    mount = next(m for m in container(manifests)["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/app/models", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert {k: v for k, v in volume.items() if k != "name"} == values["models"]["volume"]
    data = manifests["ConfigMap"]["data"]
    assert data["GENREC_MODELS_ROOT"] == "/app/models"
    assert data.get("GENREC_BUNDLE_DIR", "") == values["models"]["bundleDir"]


def test_selectors_match_the_pods(case) -> None:
    _, manifests = case
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = manifests["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert manifests["Service"]["spec"]["selector"] == selector
    assert manifests["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    if "PodDisruptionBudget" in manifests:
        assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


def test_admin_token_comes_from_a_secret(case) -> None:
    values, manifests = case
    env = {e["name"]: e for e in container(manifests).get("env", [])}
    if not values["adminToken"] and not values["existingSecret"]:
        assert "GENREC_ADMIN_TOKEN" not in env and "Secret" not in manifests
        return
    ref = env["GENREC_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "admin-token"
    if values["existingSecret"]:
        assert ref["name"] == values["existingSecret"] and "Secret" not in manifests
    else:
        secret = manifests["Secret"]
        assert ref["name"] == secret["metadata"]["name"]
        assert base64.b64decode(secret["data"]["admin-token"]).decode() == values["adminToken"]
    assert "GENREC_ADMIN_TOKEN" not in manifests["ConfigMap"]["data"]  # never in the ConfigMap


def test_gpu_resources_only_when_asked(case) -> None:
    values, manifests = case
    limits = container(manifests)["resources"].get("limits", {})
    providers = manifests["ConfigMap"]["data"]["GENREC_ONNX_PROVIDERS"]
    if values["gpu"]["enabled"]:
        assert limits[values["gpu"]["resourceName"]] == values["gpu"]["count"] and providers == "cuda,cpu"
    else:
        assert not any("gpu" in name for name in limits) and providers == "cpu"
    assert container(manifests)["resources"]["requests"]["cpu"]  # the CPU fallback of the HPA needs a request


def test_autoscaler_on_load_per_pod_with_cpu_fallback(case) -> None:
    values, manifests = case
    deployment = manifests["Deployment"]
    if not values["autoscaling"]["enabled"]:
        assert "HorizontalPodAutoscaler" not in manifests
        assert deployment["spec"]["replicas"] == values["replicaCount"]
        return
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    pods = next(m["pods"] for m in hpa["metrics"] if m["type"] == "Pods")
    cpu = next(m["resource"] for m in hpa["metrics"] if m["type"] == "Resource")
    assert pods["metric"]["name"] == values["autoscaling"]["podsMetric"]["name"]
    assert pods["metric"]["name"] in adapter_metric_names(), "prometheus-adapter does not serve the HPA's metric"
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"


# ---------------------------------------------------------------------------------------------
# prometheus-adapter rules
# ---------------------------------------------------------------------------------------------


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_metric_names() -> set[str]:
    return {rule["name"]["as"] for rule in adapter_rules()}


def test_adapter_rules_read_exported_gauges_and_parse(tmp_path: Path) -> None:
    """Each rule's series is a gauge the service exports; its query, with the adapter's template
    filled in as the adapter does for one pod, parses with promtool."""
    exposition = ServiceMetrics().render()[0].decode()
    gauges = set(re.findall(r"^# TYPE (\S+) gauge$", exposition, re.M))
    queries = []
    for rule in adapter_rules():
        series = re.match(r"([a-z_:][a-z0-9_:]*)\{", rule["seriesQuery"]).group(1)
        assert series in gauges, f"{series} is not a gauge of the service"
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        queries.append(rule["metricsQuery"].replace("<<.Series>>", series)
                       .replace("<<.LabelMatchers>>", 'namespace="recs",pod=~"genrec-.*"')
                       .replace("<<.GroupBy>>", "pod"))
    path = tmp_path / "adapter_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": f"adapter:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}))
    assert_ok(run(tool("promtool"), "check", "rules", str(path)))
