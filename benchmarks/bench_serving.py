"""Serving benchmark: the engine alone against "the usual way", end to end through HTTP and Redis,
trie scaling to 10M items, the micro-batcher settings, and the compute bound. Every ratio is
measured side by side in this one run (the machine is shared, so absolute numbers drift).

    make bench-serving            # full run (about 10 to 15 minutes on 2 cores)
    make bench-serving QUICK=1    # under 90 s: fewer sizes and shorter runs, no 10M catalog
    python benchmarks/bench_serving.py --bundle models/beauty-demo/<version> [--quick] [--as-is]

The last line of stdout is one JSON object with the headline numbers; tables go before it.
By default the bundle's beam_search.onnx is re-exported from its recommender.safetensors with the
current training/beam.py into a temporary copy, so the benchmark measures the current code
(`--as-is` serves the bundle untouched).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import loadgen  # noqa: E402
from catalogs import synthetic_semantic_ids  # noqa: E402
from flops import machine_matmul_flops, matmul_flops  # noqa: E402

from service.bundle import Bundle, load_bundle  # noqa: E402
from service.config import Settings, engine_threads, find_newest_bundle  # noqa: E402
from service.engine import OnnxBeamEngine, create_session, graph_trie_feeds  # noqa: E402
from service.trie import build_trie  # noqa: E402

HISTORY = 20
K = 10
P99_BUDGET_MS = 50.0
OUTSIDE_SHARE_TARGET = 0.25
KNEE_FRACTION = 0.9  # the peak is the lowest closed-loop load reaching this fraction of the best throughput
BUILD_HINT = (
    "build one with:\n  genrec pipeline --config beauty-demo --models-dir models --set model.d_model=128 "
    "model.d_ff=512 model.n_heads=4 model.encoder_layers=4 model.decoder_layers=4 train.epochs=1 train.eval_users=500"
)


def log(message: str) -> None:
    print(message, flush=True)


def table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    log(f"\n## {title}")
    log("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    log("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        log("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# ---- the bundle --------------------------------------------------------------------------------

def resolve_bundle(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        return find_newest_bundle(REPO / "models")
    except FileNotFoundError:
        sys.exit(f"bench_serving: no bundle under {REPO / 'models'}; pass --bundle DIR or {BUILD_HINT}")


def reexport(bundle_dir: Path, work: Path) -> tuple[Path, str]:
    """A copy of the bundle whose graphs come from the current training/beam.py."""
    if not (bundle_dir / "recommender.safetensors").is_file():
        return bundle_dir, "bundle has no recommender.safetensors: served as-is"
    from training.export import reexport_graphs

    copy = work / "bundle" / bundle_dir.parent.name / bundle_dir.name
    shutil.copytree(bundle_dir, copy)
    reexport_graphs(copy)
    return copy, "graphs re-exported with the current training/beam.py"


def random_histories(n_items: int, count: int, rng: np.random.Generator, length: int = HISTORY) -> list[np.ndarray]:
    return [rng.integers(0, n_items, size=length) for _ in range(count)]


# ---- 1. engine alone ---------------------------------------------------------------------------

def time_engine(engine, histories: list[np.ndarray], batch: int, seconds: float, min_calls: int = 5,
                workers: int = 1) -> dict:
    """`workers` threads call engine.search side by side, as the service's engine workers do
    (onnxruntime releases the GIL while it runs)."""
    engine.search(histories[:batch])  # warm-up for this shape
    per_worker: list[list[float]] = [[] for _ in range(workers)]
    start = time.perf_counter()

    def loop(w: int) -> None:
        latencies, i = per_worker[w], w * batch
        while time.perf_counter() - start < seconds or len(latencies) < min_calls:
            chunk = [histories[(i + j) % len(histories)] for j in range(batch)]
            i += batch * workers
            t0 = time.perf_counter()
            engine.search(chunk)
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    lat = np.concatenate([np.asarray(x) for x in per_worker]) * 1e3
    return {"batch": batch, "workers": workers, "rps": batch * len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "calls": len(lat)}


def engine_alone(bundle: Bundle, histories: list[np.ndarray], providers: str, threads: int, quick: bool):
    """Engine throughput and latency per batch size. On CPU two layouts of the same cores: one run at
    a time on every thread, or one run per core side by side (the service's engine workers); the
    better one at each batch size counts. On CUDA one run at a time on the device."""
    try:
        engine = OnnxBeamEngine(bundle, providers=providers, intra_op_threads=threads)
    except ValueError as error:  # no such provider in this onnxruntime
        sys.exit(f"bench_serving: {error}; for CUDA install the gpu extra (onnxruntime-gpu) instead of the cpu one")
    if providers == "cuda":
        if engine.device != "cuda":  # the CUDA provider exists but failed to load (driver, CUDA libraries)
            sys.exit(f"bench_serving: asked for CUDA but onnxruntime runs on {engine.provider}; see its warnings above")
        layouts, batch_sizes = ((engine, 1),), [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
        engine_per_core = None
    else:
        engine_per_core = OnnxBeamEngine(bundle, providers="cpu", intra_op_threads=1)
        layouts = ((engine, 1), (engine_per_core, threads)) if threads > 1 else ((engine, 1),)
        batch_sizes = [1, 4, 8, 32, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128]
    rows = []
    for b in batch_sizes:
        for eng, workers in layouts:
            rows.append(time_engine(eng, histories, b, 0.6 if quick else 2.0, workers=workers))
            log(f"  engine batch {b:>3} x {workers} worker(s): {rows[-1]['rps']:.0f} req/s, p99 {rows[-1]['p99_ms']:.1f} ms")
    return rows, engine, engine_per_core


def against_the_usual_way(bundle: Bundle, histories: list[np.ndarray], engine_rows: list[dict], args, device: str):
    """Times the usual way on `device`, prints the side-by-side table and returns (the usual way's
    best row, the engine's best row whose p99 is still below the usual way's)."""
    from usual_way import UsualT5Recommender, time_usual_way

    cfg = bundle.manifest.get("model", {}).get("config", {})
    usual = UsualT5Recommender(
        bundle.semantic_ids, [int(v) for v in bundle.semantic_ids.max(axis=0) + 1],
        d_model=cfg.get("d_model", 128), d_ff=cfg.get("d_ff", 512), n_heads=cfg.get("n_heads", 4),
        encoder_layers=cfg.get("encoder_layers", 4), decoder_layers=cfg.get("decoder_layers", 4),
        beam_size=bundle.beam_size, k=K, threads=args.threads, seed=args.seed, device=device,
    )
    # The baseline gets its better thread count (torch's threads spin, which a busy machine punishes).
    usual_rows = []
    for threads in sorted({1, args.threads}):
        usual.torch.set_num_threads(threads)
        usual_rows.append(time_usual_way(usual, histories[: 4 if args.quick else 24]) | {"threads": threads})
        log(f"  usual way ({device}), {threads} thread(s): {usual_rows[-1]['rps']:.2f} req/s, p99 {usual_rows[-1]['p99_ms']:.0f} ms")
    usual_row = max(usual_rows, key=lambda r: r["rps"])
    del usual
    faster = [r for r in engine_rows if "graph" not in r and r["p99_ms"] < usual_row["p99_ms"]]
    best = max(faster or engine_rows[:1], key=lambda r: r["rps"])
    for row in engine_rows:
        if "graph" not in row:
            row["vs_usual"] = row["rps"] / usual_row["rps"]
    table(f"Engine alone on {device} (one session.run per batch; workers = runs side by side) vs the usual way "
          "(T5 generate, one request at a time)",
          [{"graph": r.get("graph", "current"), **r} for r in engine_rows]
          + [{"graph": f"usual way (HF T5 generate, {r['threads']} thread(s))", "batch": 1, "rps": r["rps"],
              "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "vs_usual": r["rps"] / usual_row["rps"]} for r in usual_rows],
          ["graph", "batch", "workers", "rps", "p50_ms", "p99_ms", "vs_usual", "vs_current"])
    return usual_row, best


def engine_on_cuda(args, bundle: Bundle, rng) -> dict:
    """`--providers cuda`: the engine alone and the usual way on the GPU, and the GPU's top-10 checked
    against the CPU engine's for the same requests."""
    import torch

    histories = random_histories(bundle.num_items, 512, rng)
    engine_rows, engine, _ = engine_alone(bundle, histories, "cuda", args.threads, args.quick)
    cpu_engine = OnnxBeamEngine(bundle, providers="cpu", intra_op_threads=args.threads)
    checked = histories[:64]
    gpu_items, gpu_scores = engine.search(checked)
    cpu_items, cpu_scores = cpu_engine.search(checked)
    same_top_k = int(sum(np.array_equal(g[:K], c[:K]) for g, c in zip(gpu_items, cpu_items)))
    usual_row, best = against_the_usual_way(bundle, histories, engine_rows, args, "cuda")
    return {
        "providers": engine.session.get_providers(),
        "gpu": torch.cuda.get_device_name(0),
        "engine_speedup_vs_usual": round(best["rps"] / usual_row["rps"], 1),
        "engine_rps": round(best["rps"], 1),
        "engine_batch": best["batch"],
        "engine_p99_ms": round(best["p99_ms"], 2),
        "usual_rps": round(usual_row["rps"], 2),
        "usual_p99_ms": round(usual_row["p99_ms"], 1),
        "top10_equal_to_cpu": f"{same_top_k}/{len(checked)}",
        "max_top10_score_diff_vs_cpu": float(np.abs(gpu_scores[:, :K] - cpu_scores[:, :K]).max()),
    }


# ---- 3. trie scaling ---------------------------------------------------------------------------

def export_step_graph(work: Path, beam: int, vocab: int, dense: bool) -> Path:
    """ConstrainedStep alone, for a dense-row (int16) or a CSR (int32) depth; `vocab` (the widest
    codebook) is fixed at export, as in the full graph."""
    import io
    import warnings

    import torch

    from training.beam import ConstrainedStep

    path = work / f"step-{'dense' if dense else 'csr'}.onnx"
    args = (torch.zeros(2, 3, vocab), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(5, 4, dtype=torch.int16 if dense else torch.int32), torch.zeros(5, dtype=torch.int32))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ConstrainedStep(beam), args, buffer, dynamo=False, opset_version=17,
            input_names=["log_probs", "scores", "node", "trie_codes", "trie_offsets"],
            output_names=["new_scores", "new_node", "code"],
            dynamic_axes={"log_probs": {0: "b", 1: "k"}, "scores": {0: "b", 1: "k"}, "node": {0: "b", 1: "k"},
                          "trie_codes": {0: "nodes", 1: "width"}, "trie_offsets": {0: "nodes"}},
        )
    path.write_bytes(buffer.getvalue())
    return path


def step_runs(sessions, trie, vocab: int, beam: int, batch: int, rng) -> list[tuple]:
    """Per depth, the step graph for its default layout and feeds for `batch` requests x beam live
    beams at random nodes (sessions: {True: dense-row step graph, False: CSR step graph})."""
    feeds_per_depth = trie.as_feeds()
    runs = []
    for depth in range(trie.levels):
        k = 1 if depth == 0 else beam
        table = feeds_per_depth[f"trie_codes_{depth}"]
        feeds = {
            "log_probs": np.log(rng.dirichlet(np.ones(vocab), size=(batch, k))).astype(np.float32),
            "scores": -rng.random((batch, k)).astype(np.float32),
            "node": rng.integers(0, len(table), size=(batch, k)).astype(np.int64),
            "trie_codes": table, "trie_offsets": trie.offsets[depth],
        }
        session = sessions[table.dtype == np.int16]
        session.run(None, feeds)
        runs.append((session, feeds))
    return runs


def interleaved_medians(calls: dict, reps: int) -> dict:
    """Median seconds of each zero-argument call, the calls taken in turn `reps` times, so a noisy
    moment of the shared machine hits them all alike."""
    times = {key: [] for key in calls}
    for _ in range(reps):
        for key, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - t0)
    return {key: float(np.median(t)) for key, t in times.items()}


def own_item_table_size(manifest: dict) -> int | None:
    """The catalog size a model that embeds item ids (history_item_ids, item_head) indexes: its whole
    search runs only over synthetic catalogs no larger than that. None: the model sees codes alone."""
    model_cfg = manifest.get("model", {}).get("config", {})
    return model_cfg.get("item_count") if model_cfg.get("history_item_ids") or model_cfg.get("item_head") else None


def trie_scaling(bundle: Bundle, sizes: list[int], work: Path, threads: int, quick: bool, rng) -> list[dict]:
    """Build time and bytes per item of synthetic catalogs; the step time of every depth and (full
    run) the whole search at batch 32, all catalogs timed in turn."""
    codebook_sizes = [int(v) for v in bundle.semantic_ids.max(axis=0) + 1]
    declared = bundle.manifest.get("tokenizer", {}).get("codebook_sizes")
    if declared and len(declared) == len(codebook_sizes):
        codebook_sizes = [max(int(a), b) for a, b in zip(declared, codebook_sizes)]
    sessions = {dense: create_session(export_step_graph(work, bundle.beam_size, max(codebook_sizes), dense),
                                      ["CPUExecutionProvider"], threads) for dense in (True, False)}
    rows, step_calls, engine_calls, engines = [], {}, {}, []
    tied_items = own_item_table_size(bundle.manifest)
    for n in sizes:
        if n > np.prod(codebook_sizes, dtype=np.float64):
            log(f"  trie {n:>10,d} items: does not fit codebooks {codebook_sizes}, skipped")
            continue
        t0 = time.perf_counter()
        ids = synthetic_semantic_ids(n, codebook_sizes, seed=n)
        generate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        trie = build_trie(ids)
        build_s = time.perf_counter() - t0
        for depth, (session, feeds) in enumerate(step_runs(sessions, trie, max(codebook_sizes), bundle.beam_size, 32, rng)):
            step_calls[(n, depth)] = lambda session=session, feeds=feeds: session.run(None, feeds)
        layout = "".join("D" if d < trie.default_dense_levels else "C" for d in range(trie.levels))
        rows.append({"items": n, "generate_s": generate_s, "build_s": build_s, "bytes_per_item": trie.nbytes / n,
                     "layout": layout, "csr_widths": "x".join(map(str, trie.widths))})
        log(f"  trie {n:>10,d} items: generated in {generate_s:.2f} s, built in {build_s:.2f} s, "
            f"{rows[-1]['bytes_per_item']:.1f} B/item")
        if not quick and tied_items is not None and n > tied_items:
            log(f"  whole search over {n:,d} items skipped: the model embeds its own {tied_items:,d} item ids")
        elif not quick:  # the whole search over this catalog, with the real model
            catalog = Bundle(bundle.path, bundle.manifest, ids, [], [], np.zeros(0, np.int64), {})
            engine = OnnxBeamEngine(catalog, providers="cpu", intra_op_threads=threads)
            batch = random_histories(n, 32, rng)
            engine.search(batch)
            engines.append(engine)
            engine_calls[n] = lambda engine=engine, batch=batch: engine.search(batch)
        del trie, ids
    steps = interleaved_medians(step_calls, 20 if quick else 60)
    whole = interleaved_medians(engine_calls, 10) if engine_calls else {}
    for row in rows:
        n = row["items"]
        per_depth = [steps[(n, d)] * 1e3 for d in range(len(row["layout"]))]
        row["step_ms_per_level"] = "/".join(f"{s:.2f}" for s in per_depth)
        row["steps_ms_total"] = sum(per_depth)
        if n in whole:
            row["engine_ms_b32"] = whole[n] * 1e3
    del engines
    return rows


# ---- 5. end to end -----------------------------------------------------------------------------

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

    def __init__(self, bundle_dir: Path, redis_url: str, work: Path, env: dict[str, str], providers: str = "cpu") -> None:
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
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

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
                                     "genrec_engine_compute_seconds_sum", "genrec_engine_compute_seconds_count"):
                    out[sample.name] = sample.value
                elif sample.name == "genrec_rejections_total":
                    out["rejections"] = out.get("rejections", 0.0) + sample.value
        return out

    def stop(self) -> None:
        stop(self.proc)


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


# ---- main --------------------------------------------------------------------------------------

def emit_json(result: dict, json_out: Path | None) -> None:
    """The run's last stdout line, and the same line in json_out when given."""
    line = json.dumps(result)
    if json_out:
        json_out.write_text(line + "\n")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="bundle dir; default: the newest under models/")
    parser.add_argument("--quick", action="store_true", help="under 90 s: fewer points, no 10M catalog")
    parser.add_argument("--as-is", action="store_true", help="serve the bundle's own graphs (no re-export)")
    parser.add_argument("--providers", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the engine alone and the usual way on the GPU, and end to end when the "
                             "micro-batcher setting is given; no trie scaling or compute bound")
    parser.add_argument("--threads", type=int, default=2, help="threads for the engine, the usual way and matmul")
    parser.add_argument("--engine-workers", type=int, default=None,
                        help="service batches computed at once (default: tuned)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="service micro-batch size (default: tuned)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="service batch window (default: tuned)")
    parser.add_argument("--busy-intra-op-threads", type=int, default=None,
                        help="threads of a batch starting while another computes; 0 = every core (default: tuned)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="also write the JSON line here")
    args = parser.parse_args(argv)
    quick = args.quick
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    notes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    redis_proc = None
    try:
        source = resolve_bundle(args.bundle).resolve()
        log(f"# genrec serving benchmark ({'QUICK' if quick else 'full'})\nbundle: {source}")
        log(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at start; threads {args.threads}")
        if args.as_is:
            served, how = source, "served as-is"
        else:
            served, how = reexport(source, work)
        log(f"graphs: {how}")
        notes.append(how)
        bundle = load_bundle(served)
        cfg = bundle.manifest.get("model", {}).get("config", {})
        log(f"model: d_model {cfg.get('d_model')}, layers {cfg.get('encoder_layers')}+{cfg.get('decoder_layers')}, "
            f"d_ff {cfg.get('d_ff')}, heads {cfg.get('n_heads')}; items {bundle.num_items}, levels {bundle.levels}, "
            f"beam {bundle.beam_size}, k {K}, history {HISTORY}")

        # The end-to-end processes start now and idle until section 5 (startup overlaps the rest).
        redis_proc, redis_port = start_redis(work)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"

        if args.providers == "cuda":
            result = engine_on_cuda(args, bundle, rng)
            if None in (args.engine_workers, args.max_batch_size, args.max_wait_ms):
                notes.append("cuda: no end-to-end section; give --engine-workers, --max-batch-size and --max-wait-ms "
                             "(the sweep's grid is sized for CPU cores)")
            else:
                result |= end_to_end(args, bundle, served, redis_url, work, quick, rng, notes)["json"]
            emit_json(result | {"seconds": round(time.perf_counter() - t_start, 1), "notes": notes}, args.json_out)
            return 0

        # ---- 1. engine alone, 2. the usual way
        histories = random_histories(bundle.num_items, 512, rng)
        engine_rows, engine, engine_per_core = engine_alone(bundle, histories, "cpu", args.threads, quick)
        if not quick and served != source:
            own = OnnxBeamEngine(load_bundle(source), providers="cpu", intra_op_threads=args.threads)
            for b in (1, 32):
                mine = time_engine(engine, histories, b, 2.0)
                theirs = time_engine(own, histories, b, 2.0)
                engine_rows.append({"batch": b, "graph": "bundle's own (before)", **{k: theirs[k] for k in ("rps", "p50_ms", "p99_ms")},
                                    "vs_current": mine["rps"] / theirs["rps"]})
            del own
        usual_row, best = against_the_usual_way(bundle, histories, engine_rows, args, "cpu")

        # ---- 3. compute bound
        feeds_batch = 8
        from service.engine import HistoryTensorizer

        history = HistoryTensorizer(bundle.semantic_ids, bundle.max_history)(histories[:feeds_batch])
        session_inputs = {i.name: i.type for i in create_session(bundle.file("beam_search.onnx"), ["CPUExecutionProvider"]).get_inputs()}
        feeds = {n: a for n, a in history.items() if n in session_inputs} | graph_trie_feeds(build_trie(bundle.semantic_ids), session_inputs)
        counted = matmul_flops(str(bundle.file("beam_search.onnx")), feeds)
        flops_per_request = counted["matmul"] / feeds_batch
        best_engine = max((r for r in engine_rows if "graph" not in r), key=lambda r: r["rps"])
        # The engine at its best batch size and the machine's matmul rate, in alternating bursts, so
        # both see the same moments of a shared machine; the ratio is the median over the rounds.
        rounds = []
        for _ in range(3 if quick else 6):
            burst = time_engine(engine if best_engine["workers"] == 1 else engine_per_core, histories, best_engine["batch"],
                                0.6 if quick else 1.0, min_calls=2, workers=best_engine["workers"])
            machine = machine_matmul_flops(threads=args.threads, seconds=0.6 if quick else 1.0)
            # The bound takes the round's fastest matmul call: the most the hardware gave in that round.
            bound = machine["flops_per_s_best"] / flops_per_request
            rounds.append({"engine_rps": burst["rps"], "machine_gflops_best": machine["flops_per_s_best"] / 1e9,
                           "machine_gflops_median": machine["flops_per_s_median"] / 1e9, "bound_rps": bound,
                           "ratio": burst["rps"] / bound,
                           "ratio_to_median_rate": burst["rps"] * flops_per_request / machine["flops_per_s_median"],
                           "by_library": machine["all"]})
        del engine, engine_per_core
        mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
        bound_rps = float(np.median([r["bound_rps"] for r in rounds]))
        throughput_over_bound = float(np.median([r["ratio"] for r in rounds]))
        machine_gflops = float(np.median([r["machine_gflops_best"] for r in rounds]))
        table("Compute bound (engine at its best batch and 1024^3 matmuls in alternating bursts, median round; "
              "bound = matmul MFLOP/request at the round's fastest matmul call)", [{
                  "matmul_MFLOP_per_request": flops_per_request / 1e6, "matmul_nodes": int(counted["nodes"]),
                  "GFLOPs_fastest": machine_gflops, "GFLOPs_median_by_library": mid["by_library"],
                  "bound_rps": bound_rps, "engine_rps": mid["engine_rps"], "batch": best_engine["batch"],
                  "workers": best_engine["workers"],
                  "measured_over_bound": throughput_over_bound,
                  "measured_over_median_rate": float(np.median([r["ratio_to_median_rate"] for r in rounds])),
                  "rounds": len(rounds),
              }])

        # ---- 4. trie scaling
        sizes = [10_000, 100_000, 1_000_000] if quick else [10_000, 100_000, 1_000_000, 10_000_000]
        if quick:
            notes.append("quick: the 10M catalog is left out (step_time_ratio and bytes/item use 1M)")
        scaling = trie_scaling(bundle, sizes, work, args.threads, quick, rng)
        table("Trie scaling (synthetic catalogs, the bundle's levels and codebook sizes; layout D = dense rows, C = padded CSR; step = gather (+ scatter on C) + "
              "top-k for 32 requests x beam, median)", scaling)
        if not scaling:
            notes.append("no synthetic catalog fits this bundle's codebooks: trie scaling skipped")
        small = scaling[0] if scaling else None
        large = scaling[-1] if scaling else None

        # ---- 5. end to end: real service process + Redis
        e2e = end_to_end(args, bundle, served, redis_url, work, quick, rng, notes)

        # ---- JSON
        result = {
            "quick": quick,
            "bundle": str(source),
            "engine_speedup_vs_usual": round(best["rps"] / usual_row["rps"], 1),
            "engine_rps": round(best["rps"], 1),
            "engine_batch": best["batch"],
            "engine_workers_alone": best["workers"],
            "engine_p99_ms": round(best["p99_ms"], 1),
            "usual_rps": round(usual_row["rps"], 2),
            "usual_p99_ms": round(usual_row["p99_ms"], 1),
            "usual_threads": usual_row["threads"],
            **e2e["json"],
            **scaling_json(small, large),
            "compute_bound_rps": round(bound_rps, 1),
            "matmul_mflop_per_request": round(flops_per_request / 1e6, 1),
            "machine_gflops": round(machine_gflops, 1),
            "throughput_over_compute_bound": round(throughput_over_bound, 3),
            "seconds": round(time.perf_counter() - t_start, 1),
            "notes": notes,
        }
        emit_json(result, args.json_out)
        return 0
    finally:
        stop(redis_proc)
        shutil.rmtree(work, ignore_errors=True)


def scaling_json(small: dict | None, large: dict | None) -> dict:
    if small is None or large is None:
        return {}
    big, little = _size(large["items"]), _size(small["items"])
    return {
        f"step_time_ratio_{big}_vs_{little}": round(large["steps_ms_total"] / small["steps_ms_total"], 2),
        f"trie_bytes_per_item_{big}": round(large["bytes_per_item"], 1),
        f"trie_build_s_{big}": round(large["build_s"], 2),
        **({f"engine_time_ratio_{big}_vs_{little}": round(large["engine_ms_b32"] / small["engine_ms_b32"], 2)}
           if "engine_ms_b32" in large else {}),
    }


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def end_to_end(args, bundle: Bundle, served: Path, redis_url: str, work: Path, quick: bool, rng, notes: list[str]) -> dict:
    seconds = 3.0 if quick else 8.0
    user_ids = seed_users(redis_url, bundle, 500 if quick else 5000, rng)
    cores = args.threads

    def run_service(setting: dict) -> Service:
        svc = Service(served, redis_url, work, {
            "GENREC_MAX_BATCH_SIZE": str(setting["max_batch_size"]), "GENREC_MAX_WAIT_MS": str(setting["max_wait_ms"]),
            "GENREC_ENGINE_WORKERS": str(setting["engine_workers"]),
            "GENREC_INTRA_OP_THREADS": str(engine_threads(0, cores)),
            "GENREC_BUSY_INTRA_OP_THREADS": str(setting["busy_intra_op_threads"]),
            "GENREC_MAX_QUEUE_SIZE": "1024"}, providers=args.providers)
        svc.wait_ready()
        return svc

    def find_peak(svc: Service, make, setting: dict, seconds_each: float) -> tuple[dict, list[dict]]:
        """Closed loop at 1, 1.5, 2 and 4 full rounds of batches in flight. The peak is the knee:
        the lowest load within 10% of the best throughput, since clients beyond it mostly lengthen
        the queue: at 2 rounds every request waits out a whole batch, so the share outside the
        engine is 0.5 by construction (the JSON also gives the share at the highest load)."""
        in_flight = setting["engine_workers"] * setting["max_batch_size"]
        rows = [measure(svc, make, "closed", round(c * in_flight), seconds_each) for c in (1, 1.5, 2, 4)]
        best = max(r["achieved_rps"] for r in rows)
        knee = next(r for r in rows if r["achieved_rps"] >= KNEE_FRACTION * best)
        return knee | {"one_round_fraction": rows[0]["achieved_rps"] / best}, rows

    fixed = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "engine_workers": args.engine_workers,
             "busy_intra_op_threads": args.busy_intra_op_threads}
    if quick or all(fixed[k] is not None for k in ("max_batch_size", "max_wait_ms", "engine_workers")):
        defaults = Settings()  # the service's own defaults, from an earlier sweep
        setting = {"max_batch_size": defaults.max_batch_size, "max_wait_ms": defaults.max_wait_ms,
                   "engine_workers": min(defaults.engine_workers, cores), "busy_intra_op_threads": defaults.busy_intra_op_threads}
        setting |= {k: v for k, v in fixed.items() if v is not None}
        if quick:
            notes.append(f"quick: no micro-batcher sweep ({setting})")
    else:
        # Each setting: its peak, then open-loop Poisson arrivals at 70% of that peak. The chosen one
        # meets both targets (p99 <= 50 ms at 70% of its own peak, outside share <= 0.25 at peak) in
        # its worst measurement, with the most peak (pick_finalists, choose_finalist); failing that, the
        # first in rank_settings' order. Larger batches and a short window raise the peak
        # and cut the share outside the engine; smaller ones cut the engine call and so the tail at 70%.
        # Threads: every core for a batch computing alone (engine_threads), so one computing while
        # another batch's clients are between answer and next request uses them all; a batch starting
        # while another computes gets one thread (busy 1) or every core too (busy 0, sharing them).
        # Which is better depends on the machine: one thread each gave 1.2-1.5x the engine throughput
        # on a slow 2-core machine, sharing kept the knee at one round on a fast one. A window of 0 ms
        # (each batch takes only what is queued) was never the pick with up to `cores` workers (runs C-P).
        grid = [{"engine_workers": w, "max_batch_size": b, "max_wait_ms": t, "busy_intra_op_threads": busy}
                for w in sorted({1, cores}) for busy in ((0,) if w == 1 else (1, 0)) for b in (4, 8, 16) for t in (2.0, 5.0)]
        grid = [g for g in grid if all(fixed[k] is None or g[k] == fixed[k] for k in g)]

        def measure_setting(setting: dict, seconds_each: float, window_s: float, seed: int) -> dict:
            svc = run_service(setting)
            try:
                make = request_factory(svc.port, user_ids, seed=seed)
                peak = find_peak(svc, make, setting, seconds_each)[0]
                window = measure(svc, make, "open", 0.7 * peak["achieved_rps"], window_s, seed=seed)
            finally:
                svc.stop()
            return {"peak": peak, "window": window}

        measured: dict[tuple, list[dict]] = {}
        tuning_rows = []
        for g in grid:
            measured[key(g)] = [measure_setting(g, 3.0, 5.0, seed=g["max_batch_size"])]
            row = setting_row(g, measured[key(g)])
            tuning_rows.append(row)
            log(f"  {g}: peak {row['peak_rps']:.0f} req/s, outside share {_fmt(row['outside_share_at_peak'])}; "
                f"at 70% p99 {row['p99_ms_at_70pct']:.1f} ms")
        table("Micro-batcher settings (peak: closed loop; then open loop at 70% of that peak)", tuning_rows)
        # One pass over 3-s windows ranks the grid, but its leaders are the ones luck favoured most in
        # that pass (runs Q-S: each pick missed a target in its final measurement while the default
        # met both in fixed runs). The leaders are measured again, interleaved, over the final's
        # windows, and the choice rests on each one's worst measurement (choose_finalist).
        finalists = [{k: r[k] for k in SETTING_KEYS} for r in pick_finalists(tuning_rows)]
        for round_index in range(FINALIST_ROUNDS):
            for setting in finalists:
                measured[key(setting)].append(measure_setting(setting, seconds, seconds, seed=100 * (round_index + 1)
                                                              + setting["max_batch_size"]))
        final_rows = [setting_row(f, measured[key(f)]) for f in finalists]
        table(f"Finalists: each one's worst of the sweep and {FINALIST_ROUNDS} interleaved passes over {seconds:.0f}-s windows",
              final_rows)
        chosen = choose_finalist(final_rows)
        setting = {k: chosen[k] for k in SETTING_KEYS}
        log(f"  chosen: {setting}")

    svc = run_service(setting)
    try:
        served_on = json.loads(svc.get("/info")[1])["provider"]  # what the service's engine really runs on
        make = request_factory(svc.port, user_ids, seed=1)
        peak_row, closed_rows = find_peak(svc, make, setting, seconds)
        peak = peak_row["achieved_rps"]
        fractions = (0.3, 0.7, 1.0) if quick else (0.1, 0.2, 0.4, 0.55, 0.7, 0.85, 1.0)
        open_rows = []
        for f in fractions:
            row = measure(svc, make, "open", f * peak, seconds, seed=int(f * 100))
            row["fraction_of_peak"] = f
            open_rows.append(row)
            log(f"  open loop {f:.0%} of peak ({f * peak:.0f} req/s): p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms")
        columns = ["mode", "workers", "fraction_of_peak", "offered_rps", "achieved_rps", "p50_ms", "p99_ms", "mean_ms",
                   "service_ms", "history_ms", "queue_ms", "engine_ms", "response_ms", "mean_batch", "compute_ms_per_batch",
                   "outside_share_service", "outside_share_client", "non_200", "errors"]
        table(f"End to end: HTTP + Redis + micro-batcher {setting} + engine; user_id requests "
              "(history read from Redis)", closed_rows + open_rows, columns)
        # Kept up: every arrival answered 200 within the p99 budget (achieved against offered rps would
        # also judge the Poisson draw, a few percent off the rate in a short window).
        within = [r for r in open_rows if r["p99_ms"] <= P99_BUDGET_MS and r["ok"] == r["sent"]]
        max_rps_within = max((r["achieved_rps"] for r in within), default=0.0)
        # p99 over one window of a few thousand requests swings with every hiccup of a shared
        # machine: 70% of peak is measured twice more and the median of the three windows reported.
        at70_rows = [next(r for r in open_rows if r["fraction_of_peak"] == 0.7)]
        if not quick:
            at70_rows += [measure(svc, make, "open", 0.7 * peak, seconds, seed=700 + i) for i in range(2)]
        at70 = sorted(at70_rows, key=lambda r: r["p99_ms"])[len(at70_rows) // 2]
        log("  p99 at 70% of peak, by window: " + ", ".join(f"{r['p99_ms']:.1f} ms" for r in at70_rows))
        locust_users = 48 if quick else 96
        locust = run_locust(svc.port, served / "items.jsonl", locust_users, 8 if quick else 20, work)
        table(f"Locust closed loop ({locust_users} users, think time 50-200 ms, deploy/locustfile.py mix)",
              [{"name": k, **v} for k, v in locust.items()])
    finally:
        svc.stop()
    return {"json": {
        "e2e_provider": served_on,
        "e2e_peak_rps": round(peak, 1),
        "e2e_peak_p99_ms": round(peak_row["p99_ms"], 1),
        "e2e_p99_ms_at_70pct_peak": round(at70["p99_ms"], 1),
        "e2e_p99_ms_at_70pct_peak_windows": [round(r["p99_ms"], 1) for r in at70_rows],
        "e2e_p50_ms_at_70pct_peak": round(at70["p50_ms"], 1),
        "e2e_max_rps_with_p99_le_50ms": round(max_rps_within, 1),
        "outside_engine_share_at_peak": _round(peak_row.get("outside_share_service")),
        "e2e_one_round_fraction_of_best": _round(peak_row["one_round_fraction"]),
        "outside_engine_share_at_peak_client": _round(peak_row.get("outside_share_client")),
        "outside_engine_share_at_70pct_peak": _round(at70.get("outside_share_service")),
        "outside_engine_share_at_max_load": _round(closed_rows[-1].get("outside_share_service")),
        "max_load_rps": round(closed_rows[-1]["achieved_rps"], 1),
        "locust_rps": round(locust.get("Aggregated", {}).get("rps", 0.0), 1),
        "locust_p99_ms": locust.get("Aggregated", {}).get("p99_ms"),
        **setting, "intra_op_threads": engine_threads(0, cores),
    }}


def meets_both_targets(row: dict) -> bool:
    """The end-to-end bar for a setting's row (setting_row): p99 <= 50 ms at 70% of peak and <= 25%
    of the time outside the engine at peak."""
    share = row.get("outside_share_at_peak")
    return row["p99_ms_at_70pct"] <= P99_BUDGET_MS and share is not None and share <= OUTSIDE_SHARE_TARGET


SETTING_KEYS = ("engine_workers", "max_batch_size", "max_wait_ms", "busy_intra_op_threads")
FINALISTS = 3  # the sweep's leaders measured again
FINALIST_ROUNDS = 2


def key(setting: dict) -> tuple:
    return tuple(setting[k] for k in SETTING_KEYS)


def setting_row(setting: dict, measurements: list[dict]) -> dict:
    """A setting judged by its worst measurement: each one is a peak (closed-loop knee) and an
    open-loop window at 70% of that peak; the least peak, the largest share outside the engine at
    peak, the least one-round fraction and the largest p99 at 70%."""
    peaks = [m["peak"] for m in measurements]
    windows = [m["window"] for m in measurements]
    shares = [p.get("outside_share_service") for p in peaks]
    peak_row = min(peaks, key=lambda r: r["achieved_rps"])
    at70 = max(windows, key=lambda r: r["p99_ms"])
    return {k: setting[k] for k in SETTING_KEYS} | {
        "peak_rps": peak_row["achieved_rps"], "peak_p99_ms": peak_row["p99_ms"],
        "outside_share_at_peak": None if None in shares else max(shares),
        "outside_share_at_peak_windows": [_round(x) for x in shares],
        "one_round_fraction": min(p["one_round_fraction"] for p in peaks),
        "rps_at_70pct": at70["achieved_rps"], "p50_ms_at_70pct": at70["p50_ms"], "p99_ms_at_70pct": at70["p99_ms"],
        "mean_batch_at_70pct": at70.get("mean_batch"), "p99_ms_at_70pct_windows": [round(r["p99_ms"], 1) for r in windows],
    }


def target_margin(row: dict) -> float:
    """How far a setting that meets both targets is from missing one, as a fraction of each target's
    room: p99 at 70% below 50 ms, the share below 0.25, and one-round throughput above the knee's 90%
    of the best (below it the knee slips to 1.5 rounds, where every request waits out half a batch and
    the share jumps past 0.35: the final measurement of a 1-worker pick met the p99 with room to spare
    but slipped there, 88.5% against 95-96% in its sweep windows). The smallest of the three."""
    return min(1.0 - row["p99_ms_at_70pct"] / P99_BUDGET_MS,
               1.0 - row["outside_share_at_peak"] / OUTSIDE_SHARE_TARGET,
               (row["one_round_fraction"] - KNEE_FRACTION) / (1.0 - KNEE_FRACTION))


def rank_settings(rows: list[dict]) -> list[dict]:
    """Best first, for when too few settings meet both e2e targets: those meeting both by their margin
    (target_margin), then those meeting p99 by the lowest outside share, then the rest by the lowest p99."""
    def share(r: dict) -> float:
        return 1.0 if r.get("outside_share_at_peak") is None else r["outside_share_at_peak"]

    def order(r: dict) -> tuple:
        if meets_both_targets(r):
            return (0, -target_margin(r))
        if r["p99_ms_at_70pct"] <= P99_BUDGET_MS:
            return (1, share(r))
        return (2, r["p99_ms_at_70pct"])

    return sorted(rows, key=order)


def pick_finalists(rows: list[dict]) -> list[dict]:
    """The settings meeting both e2e targets with the most peak throughput (the load a user can put
    on the service within them), topped up in rank_settings' order when fewer meet both. Ranking by
    margin alone favours low-peak settings (one worker: 345 req/s against 683 for two in run T's
    sweep), since both targets are relative to a setting's own peak."""
    meeting = [r for r in rows if meets_both_targets(r)]
    leaders = sorted(meeting, key=lambda r: -r["peak_rps"])[:FINALISTS]
    return leaders + [r for r in rank_settings(rows) if r not in leaders][:FINALISTS - len(leaders)]


def choose_finalist(rows: list[dict]) -> dict:
    """Among finalists judged by their worst measurement (setting_row): the most peak throughput
    of those still meeting both targets; if none does, the first in rank_settings' order."""
    meeting = [r for r in rows if meets_both_targets(r)]
    return max(meeting, key=lambda r: r["peak_rps"]) if meeting else rank_settings(rows)[0]


def _round(x):
    return None if x is None else round(x, 3)


if __name__ == "__main__":
    sys.exit(main())
