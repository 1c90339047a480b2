"""deploy/locustfile.py drives a live service (real process, real Redis) without a single failure.

Builds the demo bundle, starts `python -m service` on it with the `redis_server` fixture, runs
locust headless for a few seconds, and reads locust's CSV stats. Afterwards /metrics must expose
every metric that deploy/alerts.yml alerts on, so the alerts cannot silently watch nothing.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO_ROOT / "deploy" / "locustfile.py"
ALERT_RULES = REPO_ROOT / "deploy" / "alerts.yml"
LOCUST_TIMEOUT_S = 120

pytestmark = pytest.mark.slow


def locust_binary() -> str:
    venv_bin = Path(sys.executable).parent / "locust"
    if venv_bin.is_file():
        return str(venv_bin)
    found = shutil.which("locust")
    if found is None:
        pytest.fail("`locust` is not installed; install it with: pip install -e '.[dev]'", pytrace=False)
    return found


def read_stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_locust_headless_against_live_service(tiny_bundle: Path, redis_server: str, start_service, tmp_path: Path) -> None:
    # Admission off: on a busy CI machine a batch can pass the 50 ms budget and shed one request,
    # which the locustfile counts as a failure; shedding is tested in tests/service/test_admission.py.
    base_url = start_service(tiny_bundle, redis_url=redis_server, env={"GENREC_LATENCY_BUDGET_MS": "0"})
    csv_prefix = tmp_path / "locust"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENREC_")}
    env["GENREC_BUNDLE_DIR"] = str(tiny_bundle)  # the locustfile reads its items.jsonl
    cmd = [
        locust_binary(), "-f", str(LOCUSTFILE), "--headless",
        "-u", "5", "-r", "5", "-t", "5s", "--host", base_url,
        "--only-summary", "--exit-code-on-error", "1", "--csv", str(csv_prefix),
        "--stop-timeout", "5",
    ]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"locust did not finish in {LOCUST_TIMEOUT_S} s; output:\n{exc.stdout}\n{exc.stderr}")
    output = f"stdout:\n{proc.stdout[-8000:]}\nstderr:\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"locust exited {proc.returncode}\n{output}"

    stats = read_stats(csv_prefix)
    total = stats["Aggregated"]
    assert int(total["Request Count"]) > 0, output
    assert int(total["Failure Count"]) == 0, output
    for name in ("/recommend [history]", "/recommend [user_id]", "/users/{id}/events"):
        assert name in stats and int(stats[name]["Request Count"]) > 0, f"no {name} requests\n{output}"

    # Every metric the alert rules use is exported by the running service.
    metrics = httpx.get(f"{base_url}/metrics", timeout=5).text
    exported = set(re.findall(r"^# TYPE (\S+) ", metrics, re.M))
    exported |= {f"{name}_bucket" for name in exported} | {f"{name}_count" for name in exported}
    used = set(re.findall(r"\b(genrec_[a-z0-9_]+)", ALERT_RULES.read_text()))
    assert used, "no genrec_ metrics found in deploy/alerts.yml"
    assert used <= exported, f"alerts use metrics the service does not export: {sorted(used - exported)}"
    assert re.search(r'^genrec_request_duration_seconds_bucket\{[^}]*endpoint="/recommend"', metrics, re.M), (
        'the p99 alert selects endpoint="/recommend", which the service does not export'
    )
