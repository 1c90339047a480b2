"""Per-request constraints and model reload under load: the real service process and a real
redis-server on loopback.

    python benchmarks/bench_constraints.py [--bundle DIR] [--seconds S] [--reloads-only]

- peak: closed-loop /recommend throughput without constraints (32 clients, user histories from Redis);
  the open-loop rate below is 50% of it.
- constraint cost: open loop at 50% of peak, the same Poisson arrivals for three request kinds, their
  windows interleaved (none, shared, distinct, then again) so a shared machine's drift falls on all:
  `none` (no constraint), `shared filter` (every request filters on the catalog's most common attribute
  value: one restricted trie, cached, the batch's requests share its engine call), `distinct exclude`
  (each request excludes 5 items of its own: a new restriction per request, built in the engine thread,
  one engine call per request). p50/p99 from the client, throughput, failures; and each kind's
  closed-loop peak.
- reloads: open loop at 50% of peak while POST /admin/reload switches bundle versions 3 times (two
  copies of the bundle under a models root): failed requests (target 0), by status and reason, each
  reload's time, and the p99 beside that of the same load without reloads just before.

Both run with admission off (GENREC_LATENCY_BUDGET_MS=0, as bench_reliability's peak): every request
is answered, so latencies of the kinds compare on the same requests and any non-200 is a failure (with
admission on, a shared machine's noise shows as 429s at 50% of peak, with or without reloads).
Load comes from this process only (benchmarks/loadgen.py, as bench_reliability.py), to 127.0.0.1,
bounded in time. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench_common import K, log, table  # first: puts the repository and benchmarks/ on sys.path

import loadgen  # noqa: E402
from bench_reliability import HOST, Redis, measure_peak, resolve_bundle, start_service  # noqa: E402
from serving_harness import breakdown, seed_users  # noqa: E402

from service.bundle import Bundle, load_bundle  # noqa: E402

ADMIN_TOKEN = "bench-constraints-admin"
REQUESTS = 1 << 14  # pre-encoded requests per kind, cycled


def common_filter(bundle: Bundle) -> dict[str, str] | None:
    """The most common value of the attribute with the fewest distinct values (e.g. a category)."""
    counts: dict[str, Counter] = {}
    for row in bundle.attributes:
        for name, values in row.items():
            counts.setdefault(name, Counter()).update(values)
    if not counts:
        return None
    name = min(counts, key=lambda n: (len(counts[n]), n))
    return {name: counts[name].most_common(1)[0][0]}


def request_kinds(bundle: Bundle, port: int, user_ids: list[str], seed: int) -> dict[str, list[bytes]]:
    """Pre-encoded /recommend requests per kind, the same users in the same order for every kind."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, len(user_ids), size=REQUESTS)
    shared = common_filter(bundle)
    # Without item attributes the shared constraint is one include list of the catalog's popular half.
    shared_fields = {"filters": shared} if shared else {"include": [bundle.item_ids[int(i)] for i in bundle.popularity[: bundle.num_items // 2]]}
    kinds: dict[str, list[bytes]] = {"none": [], "shared filter": [], "distinct exclude": []}
    for n, user in enumerate(users):
        base = {"user_id": user_ids[int(user)], "k": K}
        excluded = [bundle.item_ids[int(i)] for i in rng.choice(bundle.num_items, 5, replace=False)]
        for kind, extra in (("none", {}), ("shared filter", shared_fields), ("distinct exclude", {"exclude": excluded})):
            kinds[kind].append(loadgen.post_json(HOST, port, "/recommend", base | extra))
    return kinds


def row(kind: str, results: list[loadgen.LoadResult], stages: dict, peak: float) -> dict:
    latencies = [x for r in results for x in r.latencies_s]
    statuses: Counter = Counter()
    for r in results:
        statuses.update(r.statuses)
    duration = sum(r.duration_s for r in results)
    return {
        "kind": kind, "offered_rps": round(results[0].offered_rps or 0, 1),
        "achieved_rps": round(len(latencies) / duration, 1) if duration else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2) if latencies else None,
        "failed": sum(n for s, n in statuses.items() if s != 200) + sum(r.errors for r in results),
        "by_status": dict(statuses), "peak_rps": round(peak, 1),
        "engine_ms": None if not stages else round(stages["engine_ms"], 2),
        "mean_batch": None if not stages or stages.get("mean_batch") is None else round(stages["mean_batch"], 2),
    }


def constraint_cost(bundle: Bundle, bundle_dir: Path, redis: Redis, work: Path, user_ids: list[str],
                    seconds: float) -> tuple[float, list[dict]]:
    svc = start_service(bundle_dir, redis.url, work, GENREC_LATENCY_BUDGET_MS="0")
    try:
        kinds = request_kinds(bundle, svc.port, user_ids, seed=1)
        makers = {kind: (lambda encoded: lambda i: encoded[i % REQUESTS])(encoded) for kind, encoded in kinds.items()}
        measure_peak(svc, makers["none"], 2.0, windows=1)  # warm
        peak = measure_peak(svc, makers["none"], 4.0)
        log(f"peak (closed loop, 32 clients, no constraint): {peak:.0f} req/s")
        peaks = {"none": peak} | {kind: measure_peak(svc, makers[kind], 4.0, windows=1) for kind in kinds if kind != "none"}
        rate = 0.5 * peak
        results: dict[str, list[loadgen.LoadResult]] = {kind: [] for kind in kinds}
        stage_sums: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for window in range(2):  # interleaved windows, the same arrivals for every kind
            for kind in kinds:
                before = svc.metrics()
                result = loadgen.run(loadgen.open_loop(HOST, svc.port, makers[kind], rate, seconds / 2, seed=10 + window))
                stage_sums[kind].append(breakdown(before, svc.metrics(), result.summary()["mean_ms"]))
                results[kind].append(result)
        rows = []
        for kind in kinds:
            engine = [s for s in stage_sums[kind] if s]
            stages = {"engine_ms": float(np.mean([s["engine_ms"] for s in engine])),
                      "mean_batch": float(np.mean([s["mean_batch"] for s in engine if s["mean_batch"] is not None]))} if engine else {}
            rows.append(row(kind, results[kind], stages, peaks[kind]))
    finally:
        svc.stop()
    table(f"constraint cost: open loop at 50% of peak ({rate:.0f} req/s), {seconds:g} s per kind in 2 interleaved "
          f"windows; peak_rps: each kind's closed-loop peak", rows)
    return peak, rows


async def admin_reload(port: int, bundle_dir: str) -> tuple[int, dict]:
    body = json.dumps({"bundle_dir": bundle_dir}).encode()
    raw = (f"POST /admin/reload HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
           f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    connection = await loadgen.Connection.open(HOST, port)
    try:
        status, answer = await connection.request(raw)
    finally:
        connection.close()
    return status, json.loads(answer or b"{}")


def rejections(svc) -> Counter:
    """genrec_rejections_total by reason (deadline: 503 past the request deadline; draining: 503 from a
    closed batcher; over_budget / queue_full: 429)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counter = Counter()
    for family in text_string_to_metric_families(svc.get("/metrics")[1].decode()):
        for sample in family.samples:
            if sample.name == "genrec_rejections_total":
                out[sample.labels["reason"]] += int(sample.value)
    return out


def reloads_under_load(bundle: Bundle, bundle_dir: Path, redis: Redis, work: Path, user_ids: list[str],
                       peak: float, reloads: int = 3) -> dict:
    models = work / "reload-models"
    versions = ["a", "b"]
    for version in versions:  # two versions of the same bundle: the manifest's version is not checksummed
        target = Path(shutil.copytree(bundle_dir, models / bundle.name / version))
        manifest = json.loads((target / "manifest.json").read_text())
        (target / "manifest.json").write_text(json.dumps(manifest | {"version": version}))
    svc = start_service(models / bundle.name / "a", redis.url, work, GENREC_ADMIN_TOKEN=ADMIN_TOKEN,
                        GENREC_MODELS_ROOT=str(models), GENREC_LATENCY_BUDGET_MS="0")
    rate = 0.5 * peak
    outcomes: list[dict] = []
    try:
        encoded = request_kinds(bundle, svc.port, user_ids, seed=3)["none"]
        make = lambda i: encoded[i % REQUESTS]  # noqa: E731
        loadgen.run(loadgen.open_loop(HOST, svc.port, make, rate, 2.0, seed=4))  # warm

        async def reload_three() -> None:
            await asyncio.sleep(2.0)
            for n in range(reloads):
                started = time.perf_counter()
                status, answer = await admin_reload(svc.port, f"{bundle.name}/{versions[(n + 1) % 2]}")
                outcomes.append({"status": status, "seconds": round(time.perf_counter() - started, 2),
                                 "current": answer.get("current", answer.get("detail"))})
                log(f"reload {n + 1}: {outcomes[-1]}")
                await asyncio.sleep(3.0)  # the old batcher drains within a request deadline (1 s) of the swap

        async def main() -> loadgen.LoadResult:
            load = asyncio.create_task(loadgen.open_loop(HOST, svc.port, make, rate, 2.0 + reloads * 8.0, seed=5))
            await reload_three()
            return await load

        # The same load without reloads first: what the p99 is on this machine now, without them.
        baseline = loadgen.run(loadgen.open_loop(HOST, svc.port, make, rate, 2.0 + reloads * 8.0, seed=5))
        before = rejections(svc)
        result = loadgen.run(main())
        reasons = dict(rejections(svc) - before)
    finally:
        svc.stop()
    failed = sum(n for s, n in result.statuses.items() if s != 200) + result.errors
    out = {"offered_rps": round(rate, 1), "sent": result.sent, "ok": result.ok, "failed": failed,
           "by_status": dict(result.statuses), "rejected_by_reason": reasons, "broken_connections": result.errors,
           "p50_ms": round(result.percentile_ms(50), 2), "p99_ms": round(result.percentile_ms(99), 2),
           "no_reload_p99_ms": round(baseline.percentile_ms(99), 2),
           "no_reload_failed": sum(n for s, n in baseline.statuses.items() if s != 200) + baseline.errors,
           "reloads_ok": sum(o["status"] == 200 for o in outcomes), "reload_seconds": [o["seconds"] for o in outcomes]}
    table(f"reloads: {reloads} POST /admin/reload under open-loop load at 50% of peak ({rate:.0f} req/s)", [out])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--seconds", type=float, default=20.0, help="open-loop seconds per constraint kind")
    parser.add_argument("--reloads-only", action="store_true", help="skip the constraint cost; peak from one short window")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-constraints-"))
    bundle_dir, bundle_note = resolve_bundle(args.bundle, work)
    bundle = load_bundle(bundle_dir)
    redis = Redis(work)
    redis.start()
    out: dict = {"bundle": f"{bundle.name}/{bundle.version}", "bundle_note": bundle_note, "items": bundle.num_items,
                 "shared_filter": common_filter(bundle), "cores": len(os.sched_getaffinity(0)),
                 "load_average_1m": round(os.getloadavg()[0], 2)}
    try:
        user_ids = seed_users(redis.url, bundle, 2000, np.random.default_rng(0))
        if args.reloads_only:
            svc = start_service(bundle_dir, redis.url, work, GENREC_LATENCY_BUDGET_MS="0")
            try:
                encoded = request_kinds(bundle, svc.port, user_ids, seed=1)["none"]
                peak = measure_peak(svc, lambda i: encoded[i % REQUESTS], 4.0)
            finally:
                svc.stop()
            rows = []
        else:
            peak, rows = constraint_cost(bundle, bundle_dir, redis, work, user_ids, args.seconds)
        out["peak_rps"] = round(peak, 1)
        for r in rows:
            key = r["kind"].replace(" ", "_")
            out |= {f"{key}_p50_ms": r["p50_ms"], f"{key}_p99_ms": r["p99_ms"], f"{key}_rps": r["achieved_rps"],
                    f"{key}_peak_rps": r["peak_rps"], f"{key}_failed": r["failed"]}
        reload_row = reloads_under_load(bundle, bundle_dir, redis, work, user_ids, peak)
        out |= {"reloads": len(reload_row["reload_seconds"]), "reloads_ok": reload_row["reloads_ok"],
                "reload_failed_requests": reload_row["failed"], "reload_requests_sent": reload_row["sent"],
                "reload_by_status": reload_row["by_status"], "reload_rejected_by_reason": reload_row["rejected_by_reason"],
                "reload_seconds": reload_row["reload_seconds"],
                "reload_p99_ms": reload_row["p99_ms"], "no_reload_p99_ms": reload_row["no_reload_p99_ms"]}
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
