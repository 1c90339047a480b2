"""Fixtures for the service tests: a demo bundle (tiny model trained in seconds) and a Redis
server that a test may stop. The session-wide `redis_server` fixture lives in tests/conftest.py."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.bundle import Bundle, load_bundle


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def demo_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.pipeline import build_demo_bundle  # tests may import training; the service may not

    return build_demo_bundle(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="session")
def demo_bundle(demo_bundle_dir: Path) -> Bundle:
    return load_bundle(demo_bundle_dir)


@pytest.fixture
def bundle_copy(demo_bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the demo bundle that a test may corrupt."""
    return Path(shutil.copytree(demo_bundle_dir, tmp_path / "models" / "demo" / demo_bundle_dir.name))


class StoppableRedis:
    """A redis-server of one test's own, so the test can take it away mid-way: kill it (SIGKILL, like a
    crash), pause it (SIGSTOP: connections hang) and start it again on the same port and directory.
    With aof=True it persists every write (appendfsync always), so a restart keeps the data."""

    def __init__(self, workdir: Path, aof: bool = False) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed: `apt-get install -y redis-server`", pytrace=False)
        self.workdir = workdir
        self.aof = aof
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}", pytrace=False)
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)  # a paused server must run to die
            os.kill(self._proc.pid, signal.SIGKILL)  # abrupt, like a crashed server
            self._proc.wait(timeout=10)

    def pause(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)


@pytest.fixture
def stoppable_redis(tmp_path: Path) -> Iterator[StoppableRedis]:
    server = StoppableRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dead_redis_url() -> str:
    """A loopback port with nothing listening: connections are refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"
