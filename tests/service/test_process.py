"""The service as its own process: `python -m service` with GENREC_* settings."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.bundle import Bundle


@pytest.mark.slow
def test_python_m_service_serves_the_bundle(start_service, demo_bundle_dir: Path, demo_bundle: Bundle,
                                            redis_server: str) -> None:
    base_url = start_service(demo_bundle_dir, redis_url=redis_server, env={"GENREC_ONNX_PROVIDERS": "cpu"})
    with httpx.Client(base_url=base_url, timeout=10) as client:
        assert client.get("/info").json()["version"] == demo_bundle.version
        history = [demo_bundle.item_ids[int(i)] for i in demo_bundle.popularity[:3]]
        assert client.post("/users/process-user/events", json={"item_ids": history}).status_code == 200
        body = client.post("/recommend", json={"user_id": "process-user", "k": 5}).json()
        assert body["strategy"] == "generative" and len(body["items"]) == 5
        assert "genrec_requests_total" in client.get("/metrics").text


def test_the_service_never_imports_torch_or_training() -> None:
    import subprocess
    import sys

    code = (
        "import sys, service.app, service.__main__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
