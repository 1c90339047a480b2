"""The serving benchmark's in-process parts: the engine alone against "the usual way", the compute
bound (the engine's throughput against the machine's matmul rate), and the trie's step time and
size on synthetic catalogs up to 10M items. No service process, no HTTP."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench_common import K, log, random_histories, table
from catalogs import synthetic_semantic_ids
from flops import machine_matmul_flops, matmul_flops

from service.bundle import Bundle
from service.engine import HistoryTensorizer, OnnxBeamEngine, create_session, graph_trie_feeds
from service.trie import build_trie


# ---- the engine alone, and the usual way -------------------------------------------------------

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

    cfg = bundle.manifest.model.get("config", {})
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


# ---- the compute bound -------------------------------------------------------------------------

def compute_bound(bundle: Bundle, histories: list[np.ndarray], engine_rows: list[dict], engine, engine_per_core,
                  threads: int, quick: bool) -> dict:
    """The engine at its best batch size (engine_rows) against the machine's matmul rate times the
    graph's matmul FLOPs per request. The two run in alternating bursts, so both see the same moments
    of a shared machine; the ratio is the median over the rounds."""
    feeds_batch = 8
    history = HistoryTensorizer(bundle.semantic_ids, bundle.max_history)(histories[:feeds_batch])
    session_inputs = {i.name: i.type for i in create_session(bundle.file("beam_search.onnx"), ["CPUExecutionProvider"]).get_inputs()}
    feeds = {n: a for n, a in history.items() if n in session_inputs} | graph_trie_feeds(build_trie(bundle.semantic_ids), session_inputs)
    counted = matmul_flops(str(bundle.file("beam_search.onnx")), feeds)
    flops_per_request = counted["matmul"] / feeds_batch
    best_engine = max((r for r in engine_rows if "graph" not in r), key=lambda r: r["rps"])
    rounds = []
    for _ in range(3 if quick else 6):
        burst = time_engine(engine if best_engine["workers"] == 1 else engine_per_core, histories, best_engine["batch"],
                            0.6 if quick else 1.0, min_calls=2, workers=best_engine["workers"])
        machine = machine_matmul_flops(threads=threads, seconds=0.6 if quick else 1.0)
        # The bound takes the round's fastest matmul call: the most the hardware gave in that round.
        bound = machine["flops_per_s_best"] / flops_per_request
        rounds.append({"engine_rps": burst["rps"], "machine_gflops_best": machine["flops_per_s_best"] / 1e9,
                       "machine_gflops_median": machine["flops_per_s_median"] / 1e9, "bound_rps": bound,
                       "ratio": burst["rps"] / bound,
                       "ratio_to_median_rate": burst["rps"] * flops_per_request / machine["flops_per_s_median"],
                       "by_library": machine["all"]})
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
    return {
        "compute_bound_rps": round(bound_rps, 1),
        "matmul_mflop_per_request": round(flops_per_request / 1e6, 1),
        "machine_gflops": round(machine_gflops, 1),
        "throughput_over_compute_bound": round(throughput_over_bound, 3),
    }


# ---- trie scaling ------------------------------------------------------------------------------

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


def own_item_table_size(manifest) -> int | None:
    """The catalog size a model that embeds item ids (history_item_ids, item_head) indexes: its whole
    search runs only over synthetic catalogs no larger than that. None: the model sees codes alone."""
    model_cfg = manifest.model.get("config", {})
    return model_cfg.get("item_count") if model_cfg.get("history_item_ids") or model_cfg.get("item_head") else None


def trie_scaling(bundle: Bundle, sizes: list[int], work: Path, threads: int, quick: bool, rng) -> list[dict]:
    """Build time and bytes per item of synthetic catalogs; the step time of every depth and (full
    run) the whole search at batch 32, all catalogs timed in turn."""
    codebook_sizes = [int(v) for v in bundle.semantic_ids.max(axis=0) + 1]
    declared = bundle.manifest.tokenizer.get("codebook_sizes")
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


def scaling_json(small: dict | None, large: dict | None) -> dict:
    """The JSON keys of trie scaling: the largest catalog against the smallest."""
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
