"""Scale-out on one host: requests/s and p99 of one and of two service processes behind one port
(haproxy, deploy/scaleout.py), sharing one Redis, side by side in one run, and the scaling
efficiency. Loopback only; bounded (about 3 x (seconds + open_seconds) + start-ups).

    make bench-scaleout [BUNDLE=models/<name>/<version>] [SECONDS=20]
    python benchmarks/bench_scaleout.py --bundle DIR --seconds 20 --concurrency 32

Settings, measured one after the other with the same requests (`/recommend` by user id, 20-item
histories seeded in Redis):
  proxy-1   one process behind haproxy
  proxy-2   two processes behind haproxy (each with the service's default settings)
  direct-1  one process, no proxy: what the proxy hop costs
Each gets a closed loop of --concurrency clients for --seconds (its throughput and p99 there), then
an open loop at 80% of proxy-1's throughput for --open-seconds (p99 at the same offered load).
Efficiency = proxy-2 req/s / (2 x proxy-1 req/s). The load generator runs in this process, on the
same cores as the service. The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import serving_harness  # noqa: E402
from bench_common import REPO, log, table  # noqa: E402

from service.bundle import load_bundle  # noqa: E402
from service.config import find_newest_bundle  # noqa: E402

OPEN_LOOP_SHARE = 0.8  # open-loop rate, as a share of proxy-1's closed-loop throughput
WARMUP_S = 2.0
USERS = 2000


class ScaleOut:
    """deploy/scaleout.py as an operator runs it: N processes behind haproxy on one port."""

    def __init__(self, processes: int, bundle_dir: Path, redis_url: str, work: Path) -> None:
        self.port = serving_harness.free_port()
        backends = [serving_harness.free_port() for _ in range(processes)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENREC_")}
        env.update(GENREC_BUNDLE_DIR=str(bundle_dir), GENREC_REDIS_URL=redis_url, GENREC_ONNX_PROVIDERS="cpu",
                   PYTHONUNBUFFERED="1")
        self.log_path = work / f"scaleout-{processes}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "deploy" / "scaleout.py"), "--processes", str(processes),
                 "--port", str(self.port), "--backend-ports", ",".join(map(str, backends))],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.backends = backends

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"bench_scaleout: deploy/scaleout.py exited; log:\n{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:  # URLError is one: not listening yet, or 503 while a process starts
                pass
            time.sleep(0.3)
        self.stop()
        sys.exit(f"bench_scaleout: not ready in {timeout:.0f} s; log:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        serving_harness.stop(self.proc)


def measure(port: int, make, concurrency: int, seconds: float, open_rate: float | None, open_seconds: float) -> dict:
    """Closed loop, then (open_seconds > 0) an open loop at open_rate, or at OPEN_LOOP_SHARE of this
    setting's own closed-loop throughput when open_rate is None."""
    loadgen.run(loadgen.closed_loop("127.0.0.1", port, make, concurrency, WARMUP_S))  # warm every process
    closed = loadgen.run(loadgen.closed_loop("127.0.0.1", port, make, concurrency, seconds)).summary()
    row = {"rps": closed["achieved_rps"], "p50_ms": closed["p50_ms"], "p99_ms": closed["p99_ms"],
           "non_200": closed["non_200"] + closed["errors"]}
    if open_seconds > 0:
        rate = open_rate if open_rate is not None else OPEN_LOOP_SHARE * closed["achieved_rps"]
        opened = loadgen.run(loadgen.open_loop("127.0.0.1", port, make, rate, open_seconds)).summary()
        row |= {"open_rps": opened["offered_rps"], "open_p50_ms": opened["p50_ms"], "open_p99_ms": opened["p99_ms"],
                "open_non_200": opened["non_200"] + opened["errors"]}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the newest bundle under models/")
    parser.add_argument("--seconds", type=float, default=20.0, help="closed-loop window per setting")
    parser.add_argument("--open-seconds", type=float, default=10.0, help="open-loop window per setting (0: none)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    args = parser.parse_args(argv)
    bundle_dir = args.bundle or find_newest_bundle(REPO / "models")
    bundle = load_bundle(bundle_dir)
    cores = os.cpu_count() or 1
    log(f"bench_scaleout: {bundle.name}/{bundle.version}, {cores} cores, {args.concurrency} clients, "
        f"{args.seconds:g} s closed + {args.open_seconds:g} s open loop per setting")

    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    redis_proc, redis_port = serving_harness.start_redis(work)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    rows: dict[str, dict] = {}
    try:
        user_ids = serving_harness.seed_users(redis_url, bundle, USERS, np.random.default_rng(0))
        open_rate = None
        for name, processes in (("proxy-1", 1), ("proxy-2", 2), ("direct-1", 1)):
            if name == "direct-1":
                target = serving_harness.Service(bundle_dir, redis_url, work, env={})
            else:
                target = ScaleOut(processes, bundle_dir, redis_url, work)
            try:
                target.wait_ready()
                make = serving_harness.request_factory(target.port, user_ids, seed=1)
                rows[name] = {"setting": name, "processes": processes} | measure(
                    target.port, make, args.concurrency, args.seconds, open_rate, args.open_seconds)
            finally:
                target.stop()
            open_rate = rows["proxy-1"].get("open_rps")  # every setting gets proxy-1's offered rate
            log(f"  {name}: {json.dumps(rows[name])}")
    finally:
        serving_harness.stop(redis_proc)

    table("Scale-out on one host (closed loop: throughput and p99; open loop at the same offered rate: p99)",
          list(rows.values()))
    one, two = rows["proxy-1"]["rps"], rows["proxy-2"]["rps"]
    result = {
        "cores": cores, "bundle": f"{bundle.name}/{bundle.version}", "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rps_1": one, "rps_2": two, "p99_ms_1": rows["proxy-1"]["p99_ms"], "p99_ms_2": rows["proxy-2"]["p99_ms"],
        "open_p99_ms_1": rows["proxy-1"].get("open_p99_ms"), "open_p99_ms_2": rows["proxy-2"].get("open_p99_ms"),
        "open_rps": rows["proxy-2"].get("open_rps"),
        "rps_direct_1": rows["direct-1"]["rps"], "p99_ms_direct_1": rows["direct-1"]["p99_ms"],
        "speedup_2_over_1": round(two / one, 3) if one else None,
        "scaling_efficiency": round(two / (2 * one), 3) if one else None,
        "proxy_cost": round(1 - one / rows["direct-1"]["rps"], 3) if rows["direct-1"]["rps"] else None,
        "non_200": sum(r["non_200"] + r.get("open_non_200", 0) for r in rows.values()),
    }
    log(f"\nscaling efficiency (2 processes / 2 x 1 process): {result['scaling_efficiency']}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
