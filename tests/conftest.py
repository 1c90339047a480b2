"""Shared fixtures: a throwaway Redis server and a factory that runs the service as a process.

Both start real processes on free loopback ports and stop them by PID at teardown. Nothing here
imports the service: `start_service` only relies on the CLI/env contract (`python -m service`,
GENREC_* environment variables, /health/ready).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

REDIS_START_TIMEOUT_S = 15.0
SERVICE_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 20_000


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    if len(text) > limit:
        text = f"... ({len(text) - limit} earlier characters cut)\n" + text[-limit:]
    return text or "<empty>"


def _stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process we started (by its PID), then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------


def _redis_ping(port: int) -> bool:
    """True if a Redis server answers PING on 127.0.0.1:port (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port, no persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed (needed by the tests that use a real history store). "
            "Install it: `apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis`.",
            pytrace=False,
        )
    workdir = tmp_path_factory.mktemp("redis")
    log_path = workdir / "redis.log"
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between choosing and binding it
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _redis_ping(port):
                break
            time.sleep(0.05)
        if proc.poll() is None and _redis_ping(port):
            try:
                yield f"redis://127.0.0.1:{port}/0"
            finally:
                _stop(proc)
            return
        _stop(proc)
        last_error = f"redis-server (exit code {proc.returncode}) did not answer PING on port {port}"
    pytest.fail(f"{last_error}; its log:\n{_log_tail(log_path)}", pytrace=False)


# ---------------------------------------------------------------------------------------------
# The service as a process
# ---------------------------------------------------------------------------------------------

StartService = Callable[..., str]

_SERVICE_LOGS = pytest.StashKey[list[Path]]()


def _wait_ready(proc: subprocess.Popen, base_url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"`python -m service` exited with code {proc.returncode} before it was ready; "
                    f"its log ({log_path}):\n{_log_tail(log_path)}",
                    pytrace=False,
                )
            try:
                response = client.get(f"{base_url}/health/ready")
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    _stop(proc)
    pytest.fail(
        f"service at {base_url} not ready after {timeout:.0f} s (last /health/ready: {last}); "
        f"its log ({log_path}):\n{_log_tail(log_path)}",
        pytrace=False,
    )


@pytest.fixture
def start_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartService]:
    """Factory: `start_service(bundle_dir, redis_url=None, **env) -> base_url`.

    Runs `python -m service` from the repository root on a free 127.0.0.1 port with a clean
    GENREC_* environment (GENREC_BUNDLE_DIR, GENREC_HOST, GENREC_PORT, GENREC_REDIS_URL when
    given, and any extra `env` such as GENREC_MAX_BATCH_SIZE="8"), waits up to 120 s for
    /health/ready, and returns "http://127.0.0.1:PORT". Every process it started is stopped
    (SIGTERM, then SIGKILL) at teardown. If startup fails, the test fails with the service log;
    if the test fails later, the log is attached to the report as "service log".
    `start_service.processes[base_url]` is the process (for tests that signal it).
    """
    started: list[subprocess.Popen] = []
    processes: dict[str, subprocess.Popen] = {}
    logs: list[Path] = []
    request.node.stash[_SERVICE_LOGS] = logs

    def _start(
        bundle_dir: str | os.PathLike[str],
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = SERVICE_READY_TIMEOUT_S,
    ) -> str:
        port = free_port()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("GENREC_")}
        child_env.update(
            GENREC_BUNDLE_DIR=str(Path(bundle_dir).resolve()),
            GENREC_HOST="127.0.0.1",
            GENREC_PORT=str(port),
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p),
            # No load balancer to wait for: stop at the first SIGTERM (a test may set its own drain).
            GENREC_DRAIN_SECONDS="0",
        )
        if redis_url is not None:
            child_env["GENREC_REDIS_URL"] = redis_url
        child_env.update(env or {})

        log_dir = Path(tempfile.mkdtemp(prefix="service-", dir=tmp_path_factory.getbasetemp()))
        log_path = log_dir / "service.log"
        child_env.setdefault("GENREC_EVENT_SPOOL_PATH", str(log_dir / "spool" / "events.jsonl"))
        logs.append(log_path)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service"],
                cwd=REPO_ROOT, env=child_env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        started.append(proc)
        base_url = f"http://127.0.0.1:{port}"
        processes[base_url] = proc
        try:
            _wait_ready(proc, base_url, log_path, ready_timeout)
        except BaseException:
            logs.remove(log_path)  # the failure message already holds this log
            raise
        return base_url

    _start.processes = processes  # type: ignore[attr-defined]
    try:
        yield _start
    finally:
        for proc in reversed(started):
            _stop(proc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the logs of services started by `start_service` to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        for i, path in enumerate(item.stash.get(_SERVICE_LOGS, [])):
            report.sections.append((f"service log {i} ({path})", _log_tail(path)))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete bundle trained in seconds on a synthetic catalog, shared by the whole session."""
    from training.pipeline import build_demo_bundle

    return build_demo_bundle(tmp_path_factory.mktemp("tiny-bundle"), seed=0)
