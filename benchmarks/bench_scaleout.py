"""Scale-out on one host: requests/s and p99 of one and of two service processes behind one port
(haproxy, deploy/scaleout.py), sharing one Redis, side by side in one run, and the scaling
efficiency. Loopback only; bounded (about 4 x (2 + seconds + open_seconds) s + start-ups).

    make bench-scaleout [BUNDLE=models/<name>/<version>] [SECONDS=20]
    python benchmarks/bench_scaleout.py --bundle DIR --seconds 20 --concurrency 32

Settings, all running from the start and measured in turns with the same requests (`/recommend` by
user id, 20-item histories seeded in Redis):
  proxy-1     one process behind haproxy (the service's default settings)
  proxy-2     two processes behind haproxy, each with the default settings (2 engine workers, every core)
  proxy-2-w1  two processes behind haproxy, each with 1 engine worker of cores/2 onnxruntime threads
  direct-1    one process, no proxy: what the proxy hop costs
Each gets a closed loop of --concurrency clients for --seconds (its throughput and p99 there), then
an open loop at half of proxy-1's throughput for --open-seconds (p99 at the same offered load), each
split into 4 windows taken in alternating order (A B C D, D C B A, ...): on a machine shared with
other work, a change in its load then falls on every setting alike.
Efficiency = a two-process setting's req/s / (2 x proxy-1 req/s), for each of the two. The load
generator runs in this process, on the same cores as the service. The last line of stdout is one JSON object.
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

OPEN_LOOP_SHARE = 0.5  # open-loop rate, as a share of proxy-1's closed-loop throughput
WARMUP_S = 2.0
ROUNDS = 4  # windows per setting, in alternating order
USERS = 2000


class ScaleOut:
    """deploy/scaleout.py as an operator runs it: N processes behind haproxy on one port."""

    def __init__(self, processes: int, bundle_dir: Path, redis_url: str, work: Path, extra_env: dict[str, str]) -> None:
        self.port = serving_harness.free_port()
        backends = [serving_harness.free_port() for _ in range(processes)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENREC_")}
        env.update(GENREC_BUNDLE_DIR=str(bundle_dir), GENREC_REDIS_URL=redis_url, GENREC_ONNX_PROVIDERS="cpu",
                   PYTHONUNBUFFERED="1", **extra_env)
        self.log_path = work / f"scaleout-{self.port}.log"
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


def combined(results: list[loadgen.LoadResult]) -> dict:
    """One setting's windows as one measurement: every latency, every status, the summed time."""
    total = loadgen.LoadResult(results[0].mode, results[0].offered_rps, sum(r.duration_s for r in results))
    for result in results:
        total.latencies_s += result.latencies_s
        total.errors += result.errors
        for status, count in result.statuses.items():
            total.statuses[status] = total.statuses.get(status, 0) + count
    return total.summary()


def rounds(names: list[str], window, seconds: float) -> dict[str, dict]:
    """Each setting gets `seconds` of load in ROUNDS windows, the order reversed every round (A B C D,
    D C B A, ...), so a change in the shared machine's load falls on every setting alike."""
    results: dict[str, list[loadgen.LoadResult]] = {name: [] for name in names}
    for number in range(ROUNDS):
        for name in names if number % 2 == 0 else names[::-1]:
            results[name].append(window(name, seconds / ROUNDS))
    return {name: combined(parts) for name, parts in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the newest bundle under models/")
    parser.add_argument("--seconds", type=float, default=20.0, help="closed-loop time per setting")
    parser.add_argument("--open-seconds", type=float, default=10.0, help="open-loop time per setting (0: none)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    args = parser.parse_args(argv)
    bundle_dir = args.bundle or find_newest_bundle(REPO / "models")
    bundle = load_bundle(bundle_dir)
    cores = os.cpu_count() or 1
    log(f"bench_scaleout: {bundle.name}/{bundle.version}, {cores} cores, {args.concurrency} clients, "
        f"{args.seconds:g} s closed + {args.open_seconds:g} s open loop per setting, in {ROUNDS} rounds")

    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    redis_proc, redis_port = serving_harness.start_redis(work)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    half_cores = {"GENREC_ENGINE_WORKERS": "1", "GENREC_INTRA_OP_THREADS": str(max(1, cores // 2))}
    settings = {"proxy-1": (1, {}), "proxy-2": (2, {}), "proxy-2-w1": (2, half_cores), "direct-1": (1, {})}
    targets: dict[str, ScaleOut | serving_harness.Service] = {}
    rows: dict[str, dict] = {}
    try:
        user_ids = serving_harness.seed_users(redis_url, bundle, USERS, np.random.default_rng(0))
        # Every setting runs from the start (idle ones cost little), so the rounds can alternate.
        for name, (processes, env) in settings.items():
            targets[name] = (serving_harness.Service(bundle_dir, redis_url, work, env=env) if name == "direct-1"
                             else ScaleOut(processes, bundle_dir, redis_url, work, env))
        for target in targets.values():
            target.wait_ready()
        makes = {name: serving_harness.request_factory(t.port, user_ids, seed=1) for name, t in targets.items()}
        names = list(settings)
        for name in names:  # warm every process
            loadgen.run(loadgen.closed_loop("127.0.0.1", targets[name].port, makes[name], args.concurrency, WARMUP_S))

        closed = rounds(names, lambda name, seconds: loadgen.run(loadgen.closed_loop(
            "127.0.0.1", targets[name].port, makes[name], args.concurrency, seconds)), args.seconds)
        for name in names:
            rows[name] = {"setting": name, "processes": settings[name][0], "rps": closed[name]["achieved_rps"],
                          "p50_ms": closed[name]["p50_ms"], "p99_ms": closed[name]["p99_ms"],
                          "non_200": closed[name]["non_200"] + closed[name]["errors"]}
        if args.open_seconds > 0:
            rate = OPEN_LOOP_SHARE * rows["proxy-1"]["rps"]
            opened = rounds(names, lambda name, seconds: loadgen.run(loadgen.open_loop(
                "127.0.0.1", targets[name].port, makes[name], rate, seconds)), args.open_seconds)
            for name in names:
                rows[name] |= {"open_rps": round(rate, 1), "open_p50_ms": opened[name]["p50_ms"],
                               "open_p99_ms": opened[name]["p99_ms"],
                               "open_non_200": opened[name]["non_200"] + opened[name]["errors"]}
        for name in names:
            log(f"  {name}: {json.dumps(rows[name])}")
    finally:
        for target in targets.values():
            target.stop()
        serving_harness.stop(redis_proc)

    table("Scale-out on one host (closed loop: throughput and p99; open loop at the same offered rate: p99)",
          list(rows.values()))
    one = rows["proxy-1"]["rps"]

    def efficiency(name: str) -> float | None:
        return round(rows[name]["rps"] / (2 * one), 3) if one else None

    result = {
        "cores": cores, "bundle": f"{bundle.name}/{bundle.version}", "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rps_1": one, "rps_2": rows["proxy-2"]["rps"], "rps_2_w1": rows["proxy-2-w1"]["rps"],
        "p99_ms_1": rows["proxy-1"]["p99_ms"], "p99_ms_2": rows["proxy-2"]["p99_ms"], "p99_ms_2_w1": rows["proxy-2-w1"]["p99_ms"],
        "open_rps": rows["proxy-1"].get("open_rps"), "open_p99_ms_1": rows["proxy-1"].get("open_p99_ms"),
        "open_p99_ms_2": rows["proxy-2"].get("open_p99_ms"), "open_p99_ms_2_w1": rows["proxy-2-w1"].get("open_p99_ms"),
        "rps_direct_1": rows["direct-1"]["rps"], "p99_ms_direct_1": rows["direct-1"]["p99_ms"],
        "scaling_efficiency": efficiency("proxy-2"), "scaling_efficiency_w1": efficiency("proxy-2-w1"),
        "proxy_cost": round(1 - one / rows["direct-1"]["rps"], 3) if rows["direct-1"]["rps"] else None,
        "non_200": sum(r["non_200"] + r.get("open_non_200", 0) for r in rows.values()),
    }
    log(f"\nscaling efficiency (2 processes / 2 x 1 process): {result['scaling_efficiency']} with the default settings, "
        f"{result['scaling_efficiency_w1']} with 1 engine worker each")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
