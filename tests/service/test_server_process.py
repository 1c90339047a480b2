"""The service as a real process on loopback: bounded clients (header size, slow headers and bodies,
idle connections, body size, per-client rate), API keys, and the drain on SIGTERM, with real sockets
and real signals."""
from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from service.bundle import Bundle

READ_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 4096


def address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded in time)."""
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12])


@pytest.fixture
def limited(start_service, demo_bundle_dir: Path) -> str:
    return start_service(demo_bundle_dir, env={
        "GENREC_ONNX_PROVIDERS": "cpu",
        "GENREC_API_KEYS": "key-a,key-b",
        "GENREC_CLIENT_RATE_PER_S": "1",
        "GENREC_CLIENT_BURST": "5",
        "GENREC_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "GENREC_REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "GENREC_KEEP_ALIVE_TIMEOUT_S": "1",
        "GENREC_MAX_BODY_BYTES": "2048",
    })


@pytest.mark.slow
def test_clients_are_bounded_and_keyed(limited: str, demo_bundle: Bundle) -> None:
    host, port = address(limited)
    history = [demo_bundle.item_ids[int(i)] for i in demo_bundle.popularity[:3]]
    with httpx.Client(base_url=limited, timeout=10) as client:
        # API keys on the work routes; probes and scrapers stay open.
        no_key = client.post("/recommend", json={"history": history, "k": 3})
        assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["detail"]
        wrong = client.post("/users/u1/events", json={"item_ids": history}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 403
        for path in ("/health/live", "/health/ready", "/info", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200, path

        # Per-client token bucket (burst 5, 1/s): one key runs out, the other is served.
        statuses = [client.post("/recommend", json={"history": history, "k": 3},
                                headers={"X-API-Key": "key-a"}).status_code for _ in range(12)]
        assert statuses[:5] == [200] * 5 and 429 in statuses
        limited_response = client.post("/recommend", json={"k": 3}, headers={"X-API-Key": "key-a"})
        if limited_response.status_code == 429:  # a token may have come back meanwhile
            assert int(limited_response.headers["retry-after"]) >= 1
            assert "over its rate" in limited_response.json()["detail"]
        assert client.post("/recommend", json={"k": 3}, headers={"X-API-Key": "key-b"}).status_code == 200

        # A body over the limit, declared: 413 before it is read.
        big = client.post("/recommend", content=b"x" * 4096,
                          headers={"X-API-Key": "key-b", "Content-Type": "application/json"})
        assert big.status_code == 413 and "GENREC_MAX_BODY_BYTES" in big.json()["detail"]

    # A header block over the limit: 431 and the connection is closed.
    with socket.create_connection((host, port)) as sock:
        filler = b"".join(b"X-Filler-%d: " % n + b"a" * 1000 + b"\r\n" for n in range(16))
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + filler)
        raw = read_until_closed(sock)
        assert status_of(raw) == 431 and b"GENREC_MAX_HEADER_BYTES" in raw

    # Half the headers, then nothing: 408 after the read timeout, and the connection is closed.
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        raw = read_until_closed(sock)
        assert status_of(raw) == 408 and b"GENREC_REQUEST_READ_TIMEOUT_S" in raw

    # Headers, then half the body: 408 with the JSON error, and the connection is closed.
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nX-API-Key: key-b\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"k\": ")
        raw = read_until_closed(sock)
        assert status_of(raw) == 408 and b"request body did not arrive" in raw

    # A connection that sends nothing, and an idle kept-alive one, are closed by the server.
    with socket.create_connection((host, port)) as sock:
        assert read_until_closed(sock) == b""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = read_until_closed(sock)
        assert status_of(raw) == 200  # answered, then closed after the 1 s keep-alive


@pytest.mark.slow
def test_sigterm_turns_readiness_off_first_keeps_serving_then_exits(start_service, demo_bundle_dir: Path,
                                                                   demo_bundle: Bundle) -> None:
    drain_s = 2.0
    # Admission off: on a busy machine it may shed a request (429), which is not what this test is about.
    base_url = start_service(demo_bundle_dir, env={"GENREC_ONNX_PROVIDERS": "cpu", "GENREC_DRAIN_SECONDS": str(drain_s),
                                                   "GENREC_LATENCY_BUDGET_MS": "0"})
    proc = start_service.processes[base_url]
    history = [demo_bundle.item_ids[int(i)] for i in demo_bundle.popularity[:3]]

    # SIGHUP does not stop it.
    os.kill(proc.pid, signal.SIGHUP)
    with httpx.Client(base_url=base_url, timeout=10) as client:
        assert client.get("/health/ready").status_code == 200
    assert proc.poll() is None

    # Four clients keep requests in flight; like a load balancer they stop sending 0.5 s after a
    # readiness probe (every 50 ms) sees 503. The port must stay open well past that.
    outcomes: list[tuple[float, str]] = []  # (seconds after the signal, negative before; outcome)
    lock = threading.Lock()
    stop_sending = threading.Event()
    signalled = math.inf

    def send() -> None:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            while not stop_sending.is_set():
                try:
                    status = str(client.post("/recommend", json={"history": history, "k": 5}).status_code)
                except httpx.HTTPError as error:
                    status = f"failed: {type(error).__name__}"
                with lock:
                    outcomes.append((time.monotonic() - signalled, status))

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    time.sleep(0.3)
    signalled = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)

    readiness: list[tuple[float, int | str]] = []
    stop_sending_at = math.inf
    with httpx.Client(base_url=base_url, timeout=5) as probe:
        while time.monotonic() - signalled < drain_s + 10:
            try:
                readiness.append((time.monotonic() - signalled, probe.get("/health/ready").status_code))
            except httpx.HTTPError:
                readiness.append((time.monotonic() - signalled, "closed"))
                break
            if readiness[-1][1] == 503 and not stop_sending.is_set():
                threading.Timer(0.5, stop_sending.set).start()
                stop_sending_at = readiness[-1][0] + 0.5
            time.sleep(0.05)
    stop_sending.set()
    for sender in senders:
        sender.join(timeout=15)
    proc.wait(timeout=20)

    states = [state for _, state in readiness]
    assert states[0] == 503, readiness[:3]  # not ready from the first probe after the signal
    assert 200 not in states and states[-1] == "closed"
    assert readiness[-1][0] >= drain_s * 0.9  # the port stayed open through the drain period...
    assert readiness[-1][0] > stop_sending_at  # ...past the moment the balancer stopped sending
    with lock:
        failed = [o for o in outcomes if o[1] != "200"]
        served_after_signal = sum(1 for at, status in outcomes if at > 0 and status == "200")
    assert not failed, failed  # in flight at the signal or sent during the drain: all answered 200
    assert served_after_signal > 0  # it kept serving after the signal


def test_a_bundle_that_cannot_be_loaded_stops_the_start_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("GENREC_")}
    env.update(GENREC_BUNDLE_DIR=str(tmp_path / "no-bundle"), GENREC_HOST="127.0.0.1", GENREC_PORT=str(free_port()),
               PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3
    assert "cannot start: service.bundle.BundleError:" in result.stderr and "no manifest.json" in result.stderr
    assert "Traceback" not in result.stderr
