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
import redis
from redis import exceptions as redis_errors

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


class LocalRedisCluster:
    """A real 3-node Redis Cluster on loopback: three `redis-server --cluster-enabled yes` processes
    on free ports, joined by `redis-cli --cluster create` (no replicas, so each node owns a third of
    the slots). Each node keeps an append-only file fsynced on every write and its own nodes.conf in
    its own folder, so a node killed by PID and started again from that folder rejoins with its data."""

    NODES = 3

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if self.binary is None or cli is None:
            pytest.fail("redis-server and redis-cli are not installed: `apt-get install -y redis-server`", pytrace=False)
        self.workdir = workdir
        ports: set[int] = set()
        while len(ports) < 2 * self.NODES:
            ports.add(free_port())
        ordered = sorted(ports)
        self.ports = [(ordered[2 * i], ordered[2 * i + 1]) for i in range(self.NODES)]  # (client port, bus port)
        self.procs: list[subprocess.Popen | None] = [None] * self.NODES
        for node in range(self.NODES):
            self.start_node(node)
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port, _ in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=30,
        )
        if created.returncode != 0:
            self.stop()
            pytest.fail(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}", pytrace=False)
        self.wait_healthy()

    @property
    def url(self) -> str:
        """One node's URL: the cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0][0]}/0"

    def start_node(self, node: int) -> None:
        port, bus_port = self.ports[node]
        node_dir = self.workdir / f"node-{node}"
        node_dir.mkdir(exist_ok=True)
        self.procs[node] = subprocess.Popen(
            [self.binary, "--port", str(port), "--cluster-port", str(bus_port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--dir", str(node_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers(port):
            if time.monotonic() > deadline or self.procs[node].poll() is not None:
                self.stop()
                pytest.fail(f"redis cluster node {node} did not start on port {port}", pytrace=False)
            time.sleep(0.05)

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis_errors.RedisError:
            return False

    def kill_node(self, node: int) -> None:
        """SIGKILL by PID: a crash, not a clean shutdown."""
        proc = self.procs[node]
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def cluster_info(self, node: int) -> dict:
        with redis.Redis(port=self.ports[node][0], socket_timeout=1, socket_connect_timeout=1) as client:
            return client.cluster("INFO")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Every node answers and reports cluster_state:ok with all 16384 slots served."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = [self.cluster_info(node) for node in range(self.NODES)]
                if all(info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384 for info in infos):
                    return
            except (OSError, redis_errors.RedisError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("the local Redis Cluster did not reach cluster_state:ok", pytrace=False)
            time.sleep(0.1)

    def stop(self) -> None:
        for node in range(self.NODES):
            self.kill_node(node)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


def build_catalog_bundle(out_dir: Path, epochs: int = 15, **model_overrides) -> Path:
    """The tiny configuration with room for new items (collision level of 8) and enough epochs that its
    recommendations follow the history's topic, so a new item's neighbours can be asked for."""
    from dataclasses import replace

    from training.configs import get_config
    from training.data import make_synthetic_dataset, write_dataset
    from training.pipeline import run_pipeline

    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), out_dir / "data")
    cfg = get_config("tiny", str(data_dir))
    cfg = replace(cfg, collision_capacity=8, train=replace(cfg.train, epochs=epochs, patience=epochs),
                  model=replace(cfg.model, **model_overrides))
    return Path(run_pipeline(cfg, seed=0, models_dir=out_dir / "models", progress=False)["bundle"])


@pytest.fixture(scope="session")
def catalog_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_catalog_bundle(tmp_path_factory.mktemp("catalog-bundle"))


@pytest.fixture(scope="session")
def catalog_dataset(catalog_bundle_dir: Path):
    """The synthetic dataset the catalog bundle was trained on (its items' texts)."""
    from training.data import load_dataset

    return load_dataset(str(catalog_bundle_dir.parent.parent.parent / "data"))
