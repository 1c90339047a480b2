"""deploy/scaleout.py: two real service processes behind real haproxy on one port, sharing a real
Redis. Requests through the one port reach both processes, a user's events written through one are
read by the other, each process is scraped on its own port, and SIGTERM stops the whole group."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = REPO_ROOT / "deploy" / "scaleout.py"
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENREC_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])), **extra)
    return env


def recommend_count(metrics_text: str) -> float:
    match = re.search(r'^genrec_requests_total\{endpoint="/recommend",status="200"\} (\S+)$', metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


def test_two_processes_behind_one_port_share_redis(tiny_bundle: Path, redis_server: str, tmp_path: Path) -> None:
    port, backends = free_port(), [free_port(), free_port()]
    log_path = tmp_path / "scaleout.log"
    env = clean_env(GENREC_BUNDLE_DIR=str(tiny_bundle), GENREC_REDIS_URL=redis_server, GENREC_ONNX_PROVIDERS="cpu")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--processes", "2", "--port", str(port),
                                 "--backend-ports", ",".join(map(str, backends))],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: the cleanup below reaches its children
    front = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"the launcher exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                try:
                    if client.get(f"{front}/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"not ready:\n{log_path.read_text()[-4000:]}"
                time.sleep(0.3)

            items = [json.loads(line)["item_id"] for line in (tiny_bundle / "items.jsonl").read_text().splitlines()[:4]]
            assert client.post(f"{front}/users/shared-user/events", json={"item_ids": items}).status_code == 200
            answers = [client.post(f"{front}/recommend", json={"user_id": "shared-user", "k": 5}).json() for _ in range(8)]
            assert all(a["strategy"] == "generative" and not a["degraded"] for a in answers)
            assert all(a["items"] == answers[0]["items"] for a in answers)  # both processes read the same history

            served = [recommend_count(client.get(f"http://127.0.0.1:{b}/metrics").text) for b in backends]
            assert all(n > 0 for n in served) and sum(served) == 8, served

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log_path.read_text()[-4000:]
        for url in [front] + [f"http://127.0.0.1:{b}" for b in backends]:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health/live", timeout=2)
    finally:
        if proc.poll() is None:  # the test failed midway: drain, else kill the group we started
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_several_processes_need_a_shared_redis() -> None:
    result = subprocess.run([sys.executable, str(LAUNCHER), "--processes", "2", "--port", str(free_port())],
                            env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "GENREC_REDIS_URL" in result.stderr
