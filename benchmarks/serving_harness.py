"""The serving benchmark's process harness: a private Redis and the real service process
(`python -m service`) on loopback ports, users' histories seeded with the service's own store, load
driven by loadgen (closed and open loop) or Locust, and what a measurement reports: latency
percentiles from the client, the time per stage from the service's /metrics, the closed-loop peak
and the goodput (the most requests per second served with p99 within P99_BUDGET_MS).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import loadgen
from bench_common import HISTORY, K, P99_BUDGET_MS, REPO, log, random_histories, round3, table

from service.bundle import Bundle
from service.config import engine_threads

KNEE_FRACTION = 0.9  # the peak is the lowest closed-loop load reaching this fraction of the best throughput


# ---- processes ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def start_redis(work: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_serving: redis-server is not installed (`make system-deps` or apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    stop(proc)
    sys.exit("bench_serving: redis-server did not start")


class Service:
    """The real service process (`python -m service`) on a free loopback port."""

    def __init__(self, bundle_dir: Path, redis_url: str, work: Path, env: dict[str, str], providers: str = "cpu",
                 cpus: set[int] | None = None) -> None:
        """cpus: the CPUs the service may run on (all of this process's when None)."""
        self.port = free_port()
        self.log_path = work / f"service-{self.port}.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("GENREC_")}
        child_env.update(GENREC_BUNDLE_DIR=str(bundle_dir), GENREC_HOST="127.0.0.1", GENREC_PORT=str(self.port),
                         GENREC_REDIS_URL=redis_url, GENREC_ONNX_PROVIDERS=providers, PYTHONUNBUFFERED="1",
                         PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        child_env.update(env)
        self.env = env
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=child_env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"bench_serving: the service exited ({self.proc.returncode}); log:\n"
                         f"{self.log_path.read_text()[-4000:]}")
            try:
                if self.get("/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        stop(self.proc)
        sys.exit(f"bench_serving: the service was not ready in {timeout:.0f} s; log:\n{self.log_path.read_text()[-4000:]}")

    def get(self, path: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head[9:12]), body

    def metrics(self) -> dict[str, float]:
        """The counters the benchmark needs from /metrics: sums and counts of the stage and request
        histograms, the batch size histogram, rejections."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(self.get("/metrics")[1].decode()):
            for sample in family.samples:
                labels = sample.labels
                if sample.name.startswith("genrec_stage_duration_seconds_") and not sample.name.endswith("_bucket"):
                    out[f"{sample.name.rsplit('_', 1)[1]}:{labels['stage']}"] = sample.value
                elif sample.name in ("genrec_request_duration_seconds_sum", "genrec_request_duration_seconds_count"):
                    if labels.get("endpoint") == "/recommend":
                        out[f"{sample.name.rsplit('_', 1)[1]}:request"] = sample.value
                elif sample.name in ("genrec_batch_size_sum", "genrec_batch_size_count", "genrec_queue_wait_seconds_sum",
                                     "genrec_engine_compute_seconds_sum", "genrec_engine_compute_seconds_count",
                                     "genrec_batch_cap", "genrec_event_loop_lag_seconds_sum",
                                     "genrec_event_loop_lag_seconds_count"):
                    out[sample.name] = sample.value
                elif sample.name == "genrec_rejections_total":
                    out["rejections"] = out.get("rejections", 0.0) + sample.value
        return out

    def stop(self) -> None:
        stop(self.proc)


# ---- one measurement ---------------------------------------------------------------------------

def breakdown(before: dict[str, float], after: dict[str, float], client_mean_ms: float) -> dict:
    """Per /recommend request: mean ms per stage (service side), the share outside the engine."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = d.get("count:request", 0.0)
    if n <= 0:
        return {}
    per = {stage: 1e3 * d.get(f"sum:{stage}", 0.0) / max(d.get(f"count:{stage}", 0.0), 1.0)
           for stage in ("history", "queue", "engine", "response")}
    request_ms = 1e3 * d["sum:request"] / n
    batches = d.get("genrec_batch_size_count", 0.0)
    return {
        "service_ms": request_ms, "history_ms": per["history"], "queue_ms": per["queue"], "engine_ms": per["engine"],
        "response_ms": per["response"],
        "mean_batch": d.get("genrec_batch_size_sum", 0.0) / batches if batches else None,
        # per batch, inside the worker thread; engine_ms is per request, as the event loop saw it
        "compute_ms_per_batch": 1e3 * d.get("genrec_engine_compute_seconds_sum", 0.0) / batches if batches else None,
        "outside_share_service": 1.0 - per["engine"] / request_ms if request_ms > 0 else None,
        "outside_share_client": 1.0 - per["engine"] / client_mean_ms if client_mean_ms > 0 else None,
        "rejections": d.get("rejections", 0.0),
    }


def seed_users(redis_url: str, bundle: Bundle, users: int, rng) -> list[str]:
    """Stored histories of HISTORY items per user, written with the service's own Redis store."""
    from service.history import RedisHistoryStore

    user_ids = [f"bench-{i}" for i in range(users)]
    histories = [[bundle.item_ids[j] for j in h] for h in random_histories(bundle.num_items, users, rng)]

    async def write() -> None:
        store = RedisHistoryStore.from_url(redis_url, max_items=HISTORY, ttl_s=3600, timeout_ms=1000)
        for start in range(0, users, 16):  # a few at a time: the client's connection pool is small
            await asyncio.gather(*(store.append(u, h) for u, h in zip(user_ids[start:start + 16], histories[start:start + 16])))
        await store.close()

    asyncio.run(write())
    return user_ids


def request_factory(port: int, user_ids: list[str], seed: int):
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(user_ids), size=1 << 16)
    encoded = [loadgen.post_json("127.0.0.1", port, "/recommend", {"user_id": u, "k": K}) for u in user_ids]
    return lambda i: encoded[picks[i & 0xFFFF]]


def measure(service: Service, make, mode: str, value: float, seconds: float, seed: int = 0) -> dict:
    before = service.metrics()
    if mode == "closed":
        result = loadgen.run(loadgen.closed_loop("127.0.0.1", service.port, make, int(value), seconds))
    else:
        result = loadgen.run(loadgen.open_loop("127.0.0.1", service.port, make, value, seconds, seed=seed))
    summary = result.summary()
    summary |= breakdown(before, service.metrics(), summary["mean_ms"])
    if mode == "closed":
        summary["workers"] = int(value)
    return summary


def run_locust(port: int, items_path: Path, users: int, seconds: int, work: Path) -> dict:
    locust = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    prefix = work / "locust"
    env = {**os.environ, "GENREC_LOCUST_ITEMS": str(items_path), "GENREC_LOCUST_MAX_HISTORY": str(HISTORY)}
    cmd = [locust, "-f", str(REPO / "deploy" / "locustfile.py"), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", f"http://127.0.0.1:{port}", "--csv", str(prefix), "--only-summary",
           "--loglevel", "WARNING"]
    subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 60)
    import csv

    with open(f"{prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    out = {}
    for name, row in rows.items():
        if name == "Aggregated" or name.startswith("/recommend"):
            out[name] = {"rps": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]),
                         "requests": int(row["Request Count"]), "failures": int(row["Failure Count"])}
    return out



# ---- a micro-batcher setting as a service process ----------------------------------------------

@dataclass
class Deployment:
    """What every service process of a run shares: the bundle it serves, the Redis with the seeded
    users, a work directory, the cores and the onnxruntime providers."""

    served: Path
    redis_url: str
    work: Path
    user_ids: list[str]
    cores: int
    providers: str = "cpu"

    def start(self, setting: dict) -> Service:
        """The service with this micro-batcher setting (engine_workers, max_batch_size, max_wait_ms,
        busy_intra_op_threads), ready to answer."""
        svc = Service(self.served, self.redis_url, self.work, {
            "GENREC_MAX_BATCH_SIZE": str(setting["max_batch_size"]), "GENREC_MAX_WAIT_MS": str(setting["max_wait_ms"]),
            "GENREC_ENGINE_WORKERS": str(setting["engine_workers"]),
            "GENREC_INTRA_OP_THREADS": str(engine_threads(0, self.cores)),
            "GENREC_BUSY_INTRA_OP_THREADS": str(setting["busy_intra_op_threads"]),
            "GENREC_MAX_QUEUE_SIZE": "1024"}, providers=self.providers)
        svc.wait_ready()
        return svc


def find_peak(svc: Service, make, setting: dict, seconds_each: float) -> tuple[dict, list[dict]]:
    """Closed loop at 1, 1.5, 2 and 4 full rounds of batches in flight. The peak is the knee: the
    lowest load within 10% of the best throughput, since clients beyond it mostly lengthen the queue:
    at 2 rounds every request waits out a whole batch, so the share outside the engine is 0.5 by
    construction (the JSON also gives the share at the highest load)."""
    in_flight = setting["engine_workers"] * setting["max_batch_size"]
    rows = [measure(svc, make, "closed", round(c * in_flight), seconds_each) for c in (1, 1.5, 2, 4)]
    best = max(r["achieved_rps"] for r in rows)
    knee = next(r for r in rows if r["achieved_rps"] >= KNEE_FRACTION * best)
    return knee | {"one_round_fraction": rows[0]["achieved_rps"] / best}, rows


# ---- goodput -----------------------------------------------------------------------------------

def p99_or_miss(row: dict) -> float:
    """An open-loop window's p99, or infinity when an arrival went unanswered or got no 200: such a
    window kept nothing within the budget (achieved against offered rps would also judge the Poisson
    draw, a few percent off the rate in a short window)."""
    return row["p99_ms"] if row["ok"] == row["sent"] and not math.isnan(row["p99_ms"]) else math.inf


def goodput(points: Iterable[tuple[float, float]], budget_ms: float = P99_BUDGET_MS) -> float:
    """The most requests per second served with p99 within the budget: the highest rate among
    (rate, p99_ms) points whose p99 is within it, 0 when none is. A window over the budget at a lower
    rate than one within it does not cap the figure: p99 over a few thousand requests swings with
    every hiccup of a shared machine, and the higher window shows the rate can be served."""
    return max((rate for rate, p99 in points if p99 <= budget_ms), default=0.0)


def next_rate(points: Sequence[tuple[float, float]], budget_ms: float = P99_BUDGET_MS, grow: float = 1.2,
              resolution: float = 0.03) -> float | None:
    """The next offered rate when stepping toward goodput, from the (offered rate, p99_ms) points so
    far: halfway between the highest rate within the budget and the lowest rate above it that is
    over it; `grow` times the highest when nothing above it is over; half the lowest when nothing is
    within. None when the two rates around the edge are within `resolution` of each other."""
    within = [rate for rate, p99 in points if p99 <= budget_ms]
    over = [rate for rate, p99 in points if p99 > budget_ms]
    if not within:
        return min(over) / 2 if over else None
    low = max(within)
    above = [rate for rate in over if rate > low]
    if not above:
        return low * grow
    high = min(above)
    return None if high - low <= resolution * high else (low + high) / 2


def step_goodput(svc: Service, make, peak_rps: float, fractions: Sequence[float], refinements: int, seconds: float,
                 seed: int = 0) -> tuple[float, list[dict]]:
    """Open-loop windows at `fractions` of the closed-loop peak, then up to `refinements` more at
    next_rate's offered rates; returns the goodput (served req/s of the highest window within the
    budget) and every window's row, in the order measured (fraction_of_peak set on each)."""
    rows = []

    def window(rate: float, fraction: float) -> None:
        rows.append(measure(svc, make, "open", rate, seconds, seed=seed + len(rows)) | {"fraction_of_peak": fraction})

    for fraction in fractions:
        window(fraction * peak_rps, fraction)
    for _ in range(refinements):
        rate = next_rate([(r["offered_rps"], p99_or_miss(r)) for r in rows])
        if rate is None:
            break
        window(rate, round(rate / peak_rps, 3))
    return goodput([(r["achieved_rps"], p99_or_miss(r)) for r in rows]), rows


# ---- the chosen setting, end to end ------------------------------------------------------------

def measure_end_to_end(dep: Deployment, setting: dict, seconds: float, quick: bool) -> dict:
    """The setting's closed-loop peak, open-loop windows at fractions of it stepped on to its goodput,
    70% of peak measured twice more (full run), and Locust's closed loop; returns the JSON keys."""
    svc = dep.start(setting)
    try:
        served_on = json.loads(svc.get("/info")[1])["provider"]  # what the service's engine really runs on
        make = request_factory(svc.port, dep.user_ids, seed=1)
        peak_row, closed_rows = find_peak(svc, make, setting, seconds)
        peak = peak_row["achieved_rps"]
        fractions = (0.3, 0.7, 1.0) if quick else (0.1, 0.2, 0.4, 0.55, 0.7, 0.85, 1.0)
        goodput_rps, open_rows = step_goodput(svc, make, peak, fractions, 2 if quick else 3, seconds, seed=100)
        for row in open_rows:
            log(f"  open loop {row['fraction_of_peak']:.0%} of peak ({row['offered_rps']:.0f} req/s): "
                f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms")
        log(f"  goodput: {goodput_rps:.0f} req/s served with p99 <= {P99_BUDGET_MS:.0f} ms")
        columns = ["mode", "workers", "fraction_of_peak", "offered_rps", "achieved_rps", "p50_ms", "p99_ms", "mean_ms",
                   "service_ms", "history_ms", "queue_ms", "engine_ms", "response_ms", "mean_batch", "compute_ms_per_batch",
                   "outside_share_service", "outside_share_client", "non_200", "errors"]
        table(f"End to end: HTTP + Redis + micro-batcher {setting} + engine; user_id requests "
              "(history read from Redis)", closed_rows + sorted(open_rows, key=lambda r: r["offered_rps"]), columns)
        # The windows at the fixed fractions alone, as reported before goodput stepped past them.
        at_fractions = open_rows[:len(fractions)]
        max_rps_within = goodput([(r["achieved_rps"], p99_or_miss(r)) for r in at_fractions])
        # p99 over one window of a few thousand requests swings with every hiccup of a shared
        # machine: 70% of peak is measured twice more and the median of the three windows reported.
        at70_rows = [next(r for r in at_fractions if r["fraction_of_peak"] == 0.7)]
        if not quick:
            at70_rows += [measure(svc, make, "open", 0.7 * peak, seconds, seed=700 + i) for i in range(2)]
        at70 = sorted(at70_rows, key=lambda r: r["p99_ms"])[len(at70_rows) // 2]
        log("  p99 at 70% of peak, by window: " + ", ".join(f"{r['p99_ms']:.1f} ms" for r in at70_rows))
        locust_users = 48 if quick else 96
        locust = run_locust(svc.port, dep.served / "items.jsonl", locust_users, 8 if quick else 20, dep.work)
        table(f"Locust closed loop ({locust_users} users, think time 50-200 ms, deploy/locustfile.py mix)",
              [{"name": k, **v} for k, v in locust.items()])
    finally:
        svc.stop()
    return {
        "e2e_provider": served_on,
        "e2e_goodput_rps": round(goodput_rps, 1),
        # each open-loop window: [offered req/s, p99 ms, every arrival answered 200]
        "e2e_goodput_steps": [[round(r["offered_rps"], 1), _ms(r["p99_ms"]), r["ok"] == r["sent"]]
                              for r in sorted(open_rows, key=lambda r: r["offered_rps"])],
        "e2e_peak_rps": round(peak, 1),
        "e2e_peak_p99_ms": round(peak_row["p99_ms"], 1),
        "e2e_p99_ms_at_70pct_peak": round(at70["p99_ms"], 1),
        "e2e_p99_ms_at_70pct_peak_windows": [round(r["p99_ms"], 1) for r in at70_rows],
        "e2e_p50_ms_at_70pct_peak": round(at70["p50_ms"], 1),
        "e2e_max_rps_with_p99_le_50ms": round(max_rps_within, 1),
        "outside_engine_share_at_peak": round3(peak_row.get("outside_share_service")),
        "e2e_one_round_fraction_of_best": round3(peak_row["one_round_fraction"]),
        "outside_engine_share_at_peak_client": round3(peak_row.get("outside_share_client")),
        "outside_engine_share_at_70pct_peak": round3(at70.get("outside_share_service")),
        "outside_engine_share_at_max_load": round3(closed_rows[-1].get("outside_share_service")),
        "max_load_rps": round(closed_rows[-1]["achieved_rps"], 1),
        "locust_rps": round(locust.get("Aggregated", {}).get("rps", 0.0), 1),
        "locust_p99_ms": locust.get("Aggregated", {}).get("p99_ms"),
        **setting, "intra_op_threads": engine_threads(0, dep.cores),
    }


def _ms(value: float) -> float | None:
    """A latency for the JSON line: None for a window with no answer to take it from."""
    return None if math.isnan(value) else round(value, 1)
