"""Several service processes behind one port on one host: N `python -m service` processes on
loopback ports, sharing the Redis of GENREC_REDIS_URL, behind haproxy (Debian's package).

    GENREC_REDIS_URL=redis://127.0.0.1:6379/0 GENREC_BUNDLE_DIR=models/<name>/<version> \\
      python deploy/scaleout.py --processes 2 --port 8000

Why a proxy and not uvicorn's --workers: each process keeps its own metrics registry, so every
process is scraped on its own port (printed at start; --backend-ports picks them) instead of one
shared port answering /metrics from whichever process accepted the scrape. haproxy balances by
fewest open requests and routes on each process's /health/ready, so a process that is starting or
draining gets no new requests. Every other GENREC_* variable is passed to each process unchanged.

SIGTERM or SIGINT drains: the processes get SIGTERM (readiness 503, micro-batches finish), then
haproxy stops. If any process or haproxy exits on its own, everything is stopped and the exit code
is 1, so a supervisor (systemd, compose) restarts the whole group.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


def haproxy_config(host: str, port: int, backend_ports: list[int]) -> str:
    servers = "\n".join(f"  server genrec-{i} 127.0.0.1:{p} check" for i, p in enumerate(backend_ports))
    return f"""\
global
  maxconn 4096
  # One thread: the service processes need the cores; haproxy forwards a request in microseconds.
  nbthread 1

defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 30s
  option http-keep-alive

frontend genrec
  bind {host}:{port}
  default_backend services

backend services
  balance leastconn
  # Only ready processes get requests: starting and draining ones answer 503 here.
  option httpchk GET /health/ready
  http-check expect status 200
  default-server inter 1s fall 1 rise 1
  # Keep-alive connections to the processes are shared between clients.
  http-reuse always
{servers}
"""


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="service processes behind the port")
    parser.add_argument("--host", default="127.0.0.1", help="interface haproxy binds")
    parser.add_argument("--port", type=int, default=8000, help="the one port clients use")
    parser.add_argument("--backend-ports", default="", help="comma list, one per process (default: port+1 ... port+N)")
    args = parser.parse_args(argv)

    backend_ports = [int(p) for p in args.backend_ports.split(",") if p] or [args.port + 1 + i for i in range(args.processes)]
    if len(backend_ports) != args.processes:
        parser.error(f"--backend-ports names {len(backend_ports)} ports for {args.processes} processes")
    if args.processes > 1 and not os.environ.get("GENREC_REDIS_URL"):
        parser.error("the processes must share a history store: set GENREC_REDIS_URL (each in-process store would "
                     "see only the events its own process received)")
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        parser.error("haproxy is not installed: apt-get install -y haproxy (or `make system-deps`)")

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    services: list[subprocess.Popen] = []
    proxy: subprocess.Popen | None = None
    work = Path(tempfile.mkdtemp(prefix="genrec-scaleout-"))
    try:
        for port in backend_ports:
            env = dict(os.environ, GENREC_HOST="127.0.0.1", GENREC_PORT=str(port),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            services.append(subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                                             stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(ready(p) for p in backend_ports):
            if stopping or time.monotonic() > deadline or any(s.poll() is not None for s in services):
                print("scaleout: a service process exited or was not ready in time", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)

        config = work / "haproxy.cfg"
        config.write_text(haproxy_config(args.host, args.port, backend_ports))
        proxy = subprocess.Popen([haproxy, "-f", str(config), "-db"], stdin=subprocess.DEVNULL)
        print(f"scaleout: http://{args.host}:{args.port} -> {args.processes} processes; scrape each: "
              + " ".join(f"http://127.0.0.1:{p}/metrics" for p in backend_ports), flush=True)

        while not stopping:
            if proxy.poll() is not None or any(s.poll() is not None for s in services):
                print("scaleout: a process exited; stopping the group", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        for service in services:  # drain first: haproxy sees them not ready and stops routing
            if service.poll() is None:
                os.kill(service.pid, signal.SIGTERM)
        for service in services:
            stop(service)
        if proxy is not None:
            stop(proxy, signal.SIGUSR1)  # haproxy's soft stop: finish open connections, then exit
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
