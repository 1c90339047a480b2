"""Reliability benchmark: the real service process and a real redis-server on loopback, under load.

    python benchmarks/bench_reliability.py [--bundle DIR] [--scenarios overload,outage,sigterm,soak]
                                           [--seconds S] [--soak-seconds S] [--client-cpus N]

Scenarios (each prints its table; one JSON line at the end):
- peak: closed-loop /recommend throughput of the service (user histories from Redis); the rates
  below are fractions of it.
- overload: open-loop /recommend at 2x peak, the same load against the old policy (queue bound only,
  GENREC_LATENCY_BUDGET_MS=0) and the new one (admission by expected latency, 50 ms budget), side by
  side: p99 of the accepted requests against the 50 ms budget, the share refused with 429, errors.
- outage: events (sequential writers with retries, as clients, each event with an event id) and
  recommends (open loop) at 50% of peak together while Redis is SIGKILLed for 5 s then restarted
  (AOF, appendfsync everysec, as in docker-compose.yml), and later SIGSTOPped for 3 s. Afterwards
  every user's Redis history is compared with the events the service acknowledged: lost, duplicated,
  out of order. Recovery: from Redis answering again to the spool being empty.
- sigterm: SIGTERM under load (GENREC_DRAIN_SECONDS=2). The load balancer is modelled as a probe
  of /health/ready every 20 ms that stops the load 0.5 s after it sees 503. Reports whether
  readiness said 503 before the port closed, and requests that failed after they were sent.
- soak: the outage scenario's mixed load at 50% of peak for --soak-seconds: errors, RSS growth.

Load comes from this process only, to 127.0.0.1, bounded in time and count. By default the load
generator, Redis and the service share every CPU, so the client's own work shows in the latencies it
measures; --client-cpus N gives the load generator and Redis the first N CPUs and the service the
rest, as a client on another machine would leave them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench_common import P99_BUDGET_MS, REPO, log, table  # first: puts the repository and benchmarks/ on sys.path

import loadgen  # noqa: E402
from serving_harness import Service, breakdown, free_port, request_factory, seed_users, stop  # noqa: E402

from service.bundle import Bundle, load_bundle  # noqa: E402
from service.config import find_newest_bundle  # noqa: E402

HOST = "127.0.0.1"
BUDGET_MS = P99_BUDGET_MS
# With --client-cpus: the CPUs of the service, and of this load generator and Redis (None: shared).
SERVICE_CPUS: set[int] | None = None
CLIENT_CPUS: set[int] | None = None


# ---- a Redis this benchmark may crash ----------------------------------------------------------

class Redis:
    """redis-server with AOF (appendfsync everysec, as compose runs it) on a fixed port and directory,
    so it can be SIGKILLed and started again with its data."""

    def __init__(self, work: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            sys.exit("bench_reliability: redis-server is not installed (`make system-deps`)")
        self.dir = work / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait until it answers PING; returns the monotonic time it did."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, CLIENT_CPUS)) if CLIENT_CPUS else None)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2) as sock:
                    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return time.monotonic()
            except OSError:
                pass
            time.sleep(0.02)
        sys.exit("bench_reliability: redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> float:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            stop(self.proc)


# ---- the service -------------------------------------------------------------------------------

def start_service(bundle_dir: Path, redis_url: str, work: Path, **env: str) -> Service:
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work)) / "events.jsonl"
    settings = {"GENREC_DRAIN_SECONDS": "0", "GENREC_EVENT_SPOOL_PATH": str(spool), "GENREC_MAX_QUEUE_SIZE": "256"}
    settings.update(env)
    svc = Service(bundle_dir, redis_url, work, settings, cpus=SERVICE_CPUS)
    svc.wait_ready()
    return svc


def gauge(svc: Service, name: str) -> float:
    text = svc.get("/metrics")[1].decode()
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- peak and overload -------------------------------------------------------------------------

def measure_peak(svc: Service, make, seconds: float, windows: int = 3) -> float:
    """Closed-loop throughput with 32 clients: the median of `windows` windows (on cores shared with
    other work one window can be far off)."""
    rates = [loadgen.run(loadgen.closed_loop(HOST, svc.port, make, workers=32, duration_s=seconds)).achieved_rps
             for _ in range(windows)]
    log(f"peak windows (req/s): {[round(r) for r in rates]}")
    return float(np.median(rates))


def overload_row(policy: str, result: loadgen.LoadResult, stages: dict) -> dict:
    sent = result.sent or 1
    ok = result.ok
    rejected = result.statuses.get(429, 0)
    other = sum(n for s, n in result.statuses.items() if s not in (200, 429)) + result.errors
    within = sum(1 for x in result.latencies_s if x * 1e3 <= BUDGET_MS)
    return {
        "policy": policy, "offered_rps": round(result.offered_rps or 0, 1), "sent": result.sent,
        "accepted": ok, "accepted_p50_ms": round(result.percentile_ms(50), 1),
        "accepted_p99_ms": round(result.percentile_ms(99), 1), "accepted_max_ms": round(max(result.latencies_s) * 1e3, 1)
        if result.latencies_s else None,
        "rejected_429_share": round(rejected / sent, 3), "other_failures": other,
        "goodput_rps": round(within / result.duration_s, 1),
        "client_late_starts": result.late_starts,  # arrivals this client itself sent > 5 ms late (busy cores)
        # where an accepted request's time went, service side (means): the rest is outside the route
        "service_ms": _round(stages.get("service_ms")), "queue_ms": _round(stages.get("queue_ms")),
        "engine_ms": _round(stages.get("engine_ms")), "batch": _round(stages.get("mean_batch")),
    }


def overload(bundle_dir: Path, redis: Redis, work: Path, user_ids: list[str], peak_rps: float, seconds: float) -> list[dict]:
    rows = []
    policies = (("old: queue bound only", {"GENREC_LATENCY_BUDGET_MS": "0"}),
                (f"admission, {BUDGET_MS:g} ms budget, batch size fitted to it",
                 {"GENREC_LATENCY_BUDGET_MS": str(BUDGET_MS), "GENREC_ADAPTIVE_BATCH_SIZE": "true"}),
                (f"new: admission, {BUDGET_MS:g} ms budget (the default)", {"GENREC_LATENCY_BUDGET_MS": str(BUDGET_MS)}))
    for policy, env in policies:
        svc = start_service(bundle_dir, redis.url, work, **env)
        try:
            make = request_factory(svc.port, user_ids, seed=1)
            loadgen.run(loadgen.open_loop(HOST, svc.port, make, peak_rps * 0.5, 1.0, seed=2))  # warm
            before = svc.metrics()
            result = loadgen.run(loadgen.open_loop(HOST, svc.port, make, 2 * peak_rps, seconds, seed=3))
            after = svc.metrics()
            stages = breakdown(before, after, result.summary()["mean_ms"])
            lag_probes = after.get("genrec_event_loop_lag_seconds_count", 0) - before.get("genrec_event_loop_lag_seconds_count", 0)
            lag_s = after.get("genrec_event_loop_lag_seconds_sum", 0) - before.get("genrec_event_loop_lag_seconds_sum", 0)
            rows.append(overload_row(policy, result, stages) | {
                "batch_cap_at_end": after.get("genrec_batch_cap"),
                "loop_lag_ms": _round(1e3 * lag_s / lag_probes) if lag_probes else None})
        finally:
            svc.stop()
    table(f"overload: open loop at 2x peak ({2 * peak_rps:.0f} req/s) for {seconds:g} s, same load, one run",
          rows)
    return rows


# ---- the mixed load: event writers and open-loop recommends ------------------------------------

@dataclass
class MixedLoad:
    """Events from `writers` sequential clients (each retries a failed write with the same event id,
    one user per 20 events so a whole history stays within max_history) and open-loop recommends."""

    items: list[str]
    writers: int
    acked: dict[str, list[str]] = field(default_factory=dict)  # user -> items acknowledged, in order
    statuses: dict[str, int] = field(default_factory=dict)  # "stored", "spooled", "duplicate"
    failed_event_writes: int = 0  # non-200 answers and broken connections (each retried)
    recommend_ok: int = 0
    recommend_failed: int = 0
    recommend_failures: dict[int, int] = field(default_factory=dict)  # status (0: broken connection) -> count
    recommend_degraded_in_outage: int = 0
    recommend_in_outage: int = 0
    outage: bool = False  # set by the scenario while Redis is away

    async def writer(self, port: int, lane: int, rate: float, stop_at: float, events_per_user: int = 20) -> None:
        pool = loadgen._Pool(HOST, port, 1)
        n = 0
        next_at = time.perf_counter()
        while time.perf_counter() < stop_at:
            user = f"bench-events-{lane}-{n // events_per_user}"
            item = self.items[(lane * 7 + n) % len(self.items)]
            body = {"item_ids": [item], "event_id": f"{lane}-{n}"}
            raw = loadgen.post_json(HOST, port, f"/users/{user}/events", body)
            for _attempt in range(50):  # a client retries until acknowledged (bounded)
                status, answer = await loadgen.send(pool, raw)
                if status == 200:
                    # Acknowledged: in Redis or the spool exactly once from here on. "duplicate" means
                    # the id was recorded already: by an earlier attempt of this client, or by a timed
                    # out first try of the service's own Redis write inside this request.
                    outcome = json.loads(answer)
                    key = "duplicate" if outcome["duplicate"] else outcome["status"]
                    self.statuses[key] = self.statuses.get(key, 0) + 1
                    self.acked.setdefault(user, []).append(item)
                    break
                self.failed_event_writes += 1
                await asyncio.sleep(0.05)
            n += 1
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        pool.close()

    async def recommends(self, port: int, make, rate: float, seconds: float) -> None:
        pool = loadgen._Pool(HOST, port, 256)
        rng = np.random.default_rng(5)
        arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 1.2) + 10))
        arrivals = arrivals[arrivals < seconds]
        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._recommend(pool, make(i))))
        await asyncio.gather(*tasks)
        pool.close()

    async def _recommend(self, pool, raw: bytes) -> None:
        in_outage = self.outage
        status, body = await loadgen.send(pool, raw)
        if status == 200:
            self.recommend_ok += 1
            if in_outage:
                self.recommend_in_outage += 1
                self.recommend_degraded_in_outage += b'"degraded":true' in body
        else:
            self.recommend_failed += 1
            self.recommend_failures[status] = self.recommend_failures.get(status, 0) + 1


def check_redis(redis_url: str, acked: dict[str, list[str]]) -> dict:
    import redis as redis_client

    client = redis_client.Redis.from_url(redis_url, decode_responses=True)
    lost = duplicated = misordered = 0
    try:
        for user, items in acked.items():
            stored = client.lrange(f"genrec:history:{{{user}}}", 0, -1)[::-1]
            if stored == items:
                continue
            lost += max(0, len(items) - len(stored))
            duplicated += max(0, len(stored) - len(items))
            misordered += stored[:len(items)] != items and len(stored) == len(items)
    finally:
        client.close()
    return {"acked_events": sum(len(v) for v in acked.values()), "acked_events_lost": lost,
            "duplicated_events": duplicated, "users_out_of_order": misordered}


async def _wait_spool_empty(svc: Service, since: float, limit_s: float = 30.0) -> float | None:
    """Seconds from `since` until the service's spool is empty (polled every 50 ms)."""
    while time.monotonic() - since < limit_s:
        pending = await asyncio.to_thread(gauge, svc, "genrec_event_spool_pending")
        if pending == 0:
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    return None


def outage(bundle_dir: Path, redis: Redis, work: Path, user_ids: list[str], bundle: Bundle, peak_rps: float) -> dict:
    svc = start_service(bundle_dir, redis.url, work)
    load = MixedLoad(items=[bundle.item_ids[int(i)] for i in bundle.popularity], writers=8)
    make = request_factory(svc.port, user_ids, seed=7)
    rate = 0.5 * peak_rps
    duration = 20.0
    recovery: dict[str, float | None] = {}

    async def faults(start: float) -> None:
        await asyncio.sleep(3.0)
        load.outage = True
        redis.kill()  # t=3: crash
        log("outage: redis SIGKILLed")
        await asyncio.sleep(5.0)
        back = await asyncio.to_thread(redis.start)  # t=8: back, its AOF reloaded
        load.outage = False
        recovery["sigkill"] = await _wait_spool_empty(svc, back)
        log(f"outage: redis restarted, spool empty {recovery['sigkill']} s later")
        await asyncio.sleep(max(0.0, start + 11.0 - time.monotonic()))
        load.outage = True
        redis.pause()  # t=11: hangs
        log("outage: redis SIGSTOPped")
        await asyncio.sleep(3.0)
        back = redis.resume()
        load.outage = False
        recovery["sigstop"] = await _wait_spool_empty(svc, back)
        log(f"outage: redis resumed, spool empty {recovery['sigstop']} s later")

    async def main() -> None:
        start = time.monotonic()
        stop_at = time.perf_counter() + duration
        await asyncio.gather(
            faults(start),
            load.recommends(svc.port, make, rate / 2, duration),
            *(load.writer(svc.port, lane, rate / 2 / load.writers, stop_at) for lane in range(load.writers)),
        )
        await _wait_spool_empty(svc, time.monotonic())

    try:
        loadgen.run(main())
        checked = check_redis(redis.url, load.acked)
    finally:
        svc.stop()
    row = {
        "offered_rps": round(rate, 1), **checked, "outcomes": load.statuses,
        "failed_event_writes": load.failed_event_writes,
        "recommends_ok": load.recommend_ok, "failed_recommends": load.recommend_failed,
        "recommend_failures_by_status": load.recommend_failures,
        "degraded_share_during_outage": round(load.recommend_degraded_in_outage / max(load.recommend_in_outage, 1), 3),
        "recovery_after_sigkill_s": _round(recovery.get("sigkill")),
        "recovery_after_sigstop_s": _round(recovery.get("sigstop")),
    }
    table("outage: Redis SIGKILL 5 s (t=3) and SIGSTOP 3 s (t=11) under events + recommends at 50% of peak", [row])
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# ---- SIGTERM -----------------------------------------------------------------------------------

def sigterm(bundle_dir: Path, redis: Redis, work: Path, user_ids: list[str], peak_rps: float) -> dict:
    drain_s = 2.0
    svc = start_service(bundle_dir, redis.url, work, GENREC_DRAIN_SECONDS=str(drain_s))
    make = request_factory(svc.port, user_ids, seed=9)
    rate = 0.5 * peak_rps
    seen: dict[str, float] = {}
    # ok: 200; rejected: 429 (over capacity: answered, not a drain failure); failed_5xx: answered 5xx;
    # cut: the connection closed after the request was sent, unanswered; refused: connect refused
    # (the port was closed: never sent).
    outcomes = {"ok": 0, "rejected_429": 0, "failed_5xx": 0, "cut": 0, "refused": 0}

    async def one(raw: bytes) -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, svc.port)
        except OSError:
            outcomes["refused"] += 1  # never sent: the port was closed
            return
        try:
            conn = loadgen.Connection(reader, writer)
            status, _ = await conn.request(raw.replace(b"Connection: keep-alive", b"Connection: close"))
            outcomes["ok" if status == 200 else "rejected_429" if status == 429 else "failed_5xx"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            outcomes["cut"] += 1
        finally:
            writer.close()

    async def probe(signalled: float, stop: asyncio.Event) -> None:
        while True:
            try:
                status, _ = await asyncio.to_thread(svc.get, "/health/ready")
            except OSError:
                seen["port_closed"] = time.monotonic() - signalled
                return
            if status == 503 and "ready_503" not in seen:
                seen["ready_503"] = time.monotonic() - signalled
                asyncio.get_running_loop().call_later(0.5, stop.set)  # the balancer's reaction time
            await asyncio.sleep(0.02)

    async def main() -> None:
        stop = asyncio.Event()
        tasks = []
        start = time.monotonic()
        rng = np.random.default_rng(11)
        i = 0
        signalled = None
        next_at = start
        while not stop.is_set() and time.monotonic() - start < 15:
            if signalled is None and time.monotonic() - start >= 2.0:
                os.kill(svc.proc.pid, signal.SIGTERM)
                signalled = time.monotonic()
                tasks.append(asyncio.create_task(probe(signalled, stop)))
            tasks.append(asyncio.create_task(one(make(i))))
            i += 1
            next_at += rng.exponential(1.0 / rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)

    try:
        loadgen.run(main())
        svc.proc.wait(timeout=30)
    finally:
        svc.stop()
    row = {"offered_rps": round(rate, 1), "drain_s": drain_s, **{k: round(v, 3) for k, v in seen.items()}, **outcomes,
           "sigterm_ready_503_before_close": "ready_503" in seen and seen["ready_503"] < seen.get("port_closed", math.inf),
           "exit_code": svc.proc.returncode}
    table("sigterm under load: readiness, port, requests (seconds after the signal)", [row])
    return row


# ---- soak --------------------------------------------------------------------------------------

def soak(bundle_dir: Path, redis: Redis, work: Path, user_ids: list[str], bundle: Bundle, peak_rps: float,
         seconds: float) -> dict:
    svc = start_service(bundle_dir, redis.url, work)
    load = MixedLoad(items=[bundle.item_ids[int(i)] for i in bundle.popularity], writers=8)
    make = request_factory(svc.port, user_ids, seed=13)
    rate = 0.5 * peak_rps
    rss: dict[str, int] = {}

    async def sample() -> None:
        await asyncio.sleep(min(10.0, seconds * 0.1))  # after warm-up: allocator pools and caches filled
        rss["start"] = rss_bytes(svc.proc.pid)
        await asyncio.sleep(max(0.0, seconds - min(10.0, seconds * 0.1) - 0.5))
        rss["end"] = rss_bytes(svc.proc.pid)

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(sample(), load.recommends(svc.port, make, rate / 2, seconds),
                             *(load.writer(svc.port, lane, rate / 2 / load.writers, stop_at)
                               for lane in range(load.writers)))

    try:
        loadgen.run(main())
        checked = check_redis(redis.url, load.acked)
    finally:
        svc.stop()
    row = {"seconds": seconds, "offered_rps": round(rate, 1), "recommends_ok": load.recommend_ok,
           "recommend_failures_by_status": load.recommend_failures, "failed_event_writes": load.failed_event_writes,
           "events_acked": checked["acked_events"],
           "soak_errors": load.recommend_failed + load.failed_event_writes + checked["acked_events_lost"],
           "rss_start_mb": round(rss["start"] / 2**20, 1), "rss_end_mb": round(rss["end"] / 2**20, 1),
           "soak_rss_growth": round(rss["end"] / rss["start"] - 1.0, 4)}
    table(f"soak: events + recommends at 50% of peak for {seconds:g} s", [row])
    return row


# ---- main --------------------------------------------------------------------------------------

# The model size of the serving benchmark's bundle (bench_serving.BUILD_HINT): the engine, not the
# HTTP layer, is what limits the service, as with a real bundle.
SERVING_SIZED = ["model.d_model=128", "model.d_ff=512", "model.n_heads=4", "model.encoder_layers=4",
                 "model.decoder_layers=4", "tokenizer_params.levels=3", "tokenizer_params.codebook_size=16",
                 "train.epochs=1"]


def build_serving_sized_bundle(work: Path) -> Path:
    """A bundle of the serving benchmark's model size on a synthetic catalog of 2,000 items (minutes
    on 2 busy cores; --bundle reuses one): the tiny test bundle answers so fast that the HTTP layer,
    not the engine, saturates first."""
    from training.configs import apply_overrides, get_config
    from training.data import make_synthetic_dataset, write_dataset
    from training.pipeline import run_pipeline

    data_dir = write_dataset(make_synthetic_dataset(2000, 2000, seed=0), work / "data")
    cfg = apply_overrides(get_config("tiny", str(data_dir)), SERVING_SIZED)
    return Path(run_pipeline(cfg, seed=0, models_dir=work / "models", progress=False)["bundle"])


def resolve_bundle(arg: str | None, work: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    try:
        return find_newest_bundle(REPO / "models"), "newest under models/"
    except FileNotFoundError:
        log("no bundle under models/: building a serving-sized bundle on a synthetic catalog")
        return build_serving_sized_bundle(work), "synthetic 2,000-item catalog, serving-sized model (none under models/)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--scenarios", default="overload,outage,sigterm,soak")
    parser.add_argument("--seconds", type=float, default=10.0, help="open-loop overload window per policy")
    parser.add_argument("--soak-seconds", type=float, default=180.0)
    parser.add_argument("--client-cpus", type=int, default=0,
                        help="give this load generator and Redis the first N CPUs and the service the rest, as a "
                             "load generator on another machine would leave them (0: all share every CPU)")
    args = parser.parse_args()
    scenarios = set(args.scenarios.split(","))
    global SERVICE_CPUS, CLIENT_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if args.client_cpus:
        if args.client_cpus >= len(cpus):
            sys.exit(f"bench_reliability: --client-cpus {args.client_cpus} leaves the service none of {len(cpus)} CPUs")
        CLIENT_CPUS, SERVICE_CPUS = set(cpus[: args.client_cpus]), set(cpus[args.client_cpus :])
        os.sched_setaffinity(0, CLIENT_CPUS)

    work = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    bundle_dir, bundle_note = resolve_bundle(args.bundle, work)
    bundle = load_bundle(bundle_dir)
    redis = Redis(work)
    redis.start()
    out: dict = {"bundle": f"{bundle.name}/{bundle.version}", "bundle_note": bundle_note,
                 "cores": len(cpus), "load_average_1m": round(os.getloadavg()[0], 2),
                 "service_cpus": sorted(SERVICE_CPUS) if SERVICE_CPUS else "all",
                 "client_cpus": sorted(CLIENT_CPUS) if CLIENT_CPUS else "all"}
    try:
        user_ids = seed_users(redis.url, bundle, 2000, np.random.default_rng(0))
        svc = start_service(bundle_dir, redis.url, work, GENREC_LATENCY_BUDGET_MS="0")
        try:
            make = request_factory(svc.port, user_ids, seed=0)
            measure_peak(svc, make, 2.0, windows=1)  # warm
            out["peak_rps"] = round(measure_peak(svc, make, 4.0), 1)
        finally:
            svc.stop()
        log(f"peak (closed loop, 32 clients): {out['peak_rps']} req/s")
        if "overload" in scenarios:
            old, fitted_batch, new = overload(bundle_dir, redis, work, user_ids, out["peak_rps"], args.seconds)
            out |= {"overload_fitted_batch_accepted_p99_ms": fitted_batch["accepted_p99_ms"],
                    "overload_fitted_batch_rejected_share": fitted_batch["rejected_429_share"],
                    "overload_fitted_batch_goodput_rps": fitted_batch["goodput_rps"],
                    "overload_accepted_p99_ms": new["accepted_p99_ms"],
                    "overload_rejected_share": new["rejected_429_share"],
                    "overload_goodput_rps": new["goodput_rps"],
                    "overload_old_accepted_p99_ms": old["accepted_p99_ms"],
                    "overload_old_rejected_share": old["rejected_429_share"],
                    "overload_old_goodput_rps": old["goodput_rps"]}
        if "outage" in scenarios:
            row = outage(bundle_dir, redis, work, user_ids, bundle, out["peak_rps"])
            recoveries = [r for r in (row["recovery_after_sigkill_s"], row["recovery_after_sigstop_s"]) if r is not None]
            out |= {"acked_events": row["acked_events"], "acked_events_lost": row["acked_events_lost"],
                    "duplicated_events": row["duplicated_events"], "users_out_of_order": row["users_out_of_order"],
                    "failed_event_writes": row["failed_event_writes"], "failed_recommends": row["failed_recommends"],
                    "degraded_share_during_outage": row["degraded_share_during_outage"],
                    "events_spooled": row["outcomes"].get("spooled", 0),
                    "redis_recovery_s": max(recoveries) if len(recoveries) == 2 else None}
        if "sigterm" in scenarios:
            row = sigterm(bundle_dir, redis, work, user_ids, out["peak_rps"])
            out |= {"sigterm_inflight_failed": row["failed_5xx"] + row["cut"],
                    "sigterm_ready_503_before_close": row["sigterm_ready_503_before_close"]}
        if "soak" in scenarios:
            row = soak(bundle_dir, redis, work, user_ids, bundle, out["peak_rps"], args.soak_seconds)
            out |= {"soak_seconds": args.soak_seconds, "soak_errors": row["soak_errors"],
                    "soak_rss_growth": row["soak_rss_growth"]}
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
