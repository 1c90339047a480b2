"""Serving benchmark: the engine alone against "the usual way", end to end through HTTP and Redis,
trie scaling to 10M items, the micro-batcher settings, and the compute bound. Every ratio is
measured side by side in this one run (the machine is shared, so absolute numbers drift).

    make bench-serving            # full run (about 15 to 20 minutes on 2 cores)
    make bench-serving QUICK=1    # about 90 s: fewer sizes and shorter runs, no 10M catalog, no sweep
    python benchmarks/bench_serving.py --bundle models/beauty-demo/<version> [--quick] [--as-is]

The end-to-end figure that counts is goodput (`e2e_goodput_rps`): the most requests per second
the service answers with p99 <= 50 ms, found by stepping the open-loop offered rate; and
`goodput_over_usual`, goodput over the usual way's req/s in the same run (`usual_rps`: transformers'
generate one request at a time in process, no HTTP or Redis, its better thread count). Without
--quick the micro-batcher setting is chosen by goodput (batcher_sweep.py).

The parts: engine_micro.py (engine alone, the usual way, compute bound, trie scaling),
serving_harness.py (Redis and service processes, load, end-to-end measurement), batcher_sweep.py.
The last line of stdout is one JSON object with the headline numbers; tables go before it.
By default the bundle's beam_search.onnx is re-exported from its recommender.safetensors with the
current training/beam.py into a temporary copy, so the benchmark measures the current code
(`--as-is` serves the bundle untouched).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batcher_sweep  # noqa: E402
import engine_micro  # noqa: E402
import serving_harness  # noqa: E402
from bench_common import HISTORY, K, REPO, log, random_histories, table  # noqa: E402

from service.bundle import load_bundle  # noqa: E402
from service.config import Settings, find_newest_bundle  # noqa: E402
from service.engine import OnnxBeamEngine  # noqa: E402

GOODPUT_OVER_USUAL_BASIS = "usual_rps: transformers generate, one request at a time in process (no HTTP, no Redis)"
BUILD_HINT = (
    "build one with:\n  genrec pipeline --config beauty-demo --models-dir models --set model.d_model=128 "
    "model.d_ff=512 model.n_heads=4 model.encoder_layers=4 model.decoder_layers=4 train.epochs=1 train.eval_users=500"
)


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


# ---- end to end --------------------------------------------------------------------------------

def end_to_end(args, bundle, served: Path, redis_url: str, work: Path, quick: bool, rng, notes: list[str]) -> dict:
    """The real service process against Redis: the micro-batcher setting given on the command line,
    the service's defaults (--quick), or the sweep's choice by goodput; then that setting measured."""
    seconds = 3.0 if quick else 8.0
    dep = serving_harness.Deployment(served, redis_url, work, serving_harness.seed_users(
        redis_url, bundle, 500 if quick else 5000, rng), args.threads, args.providers)
    fixed = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "engine_workers": args.engine_workers,
             "busy_intra_op_threads": args.busy_intra_op_threads}
    if quick or all(fixed[k] is not None for k in ("max_batch_size", "max_wait_ms", "engine_workers")):
        defaults = Settings()  # the service's own defaults, from an earlier sweep
        setting = {"max_batch_size": defaults.max_batch_size, "max_wait_ms": defaults.max_wait_ms,
                   "engine_workers": min(defaults.engine_workers, dep.cores),
                   "busy_intra_op_threads": defaults.busy_intra_op_threads}
        setting |= {k: v for k, v in fixed.items() if v is not None}
        if quick:
            notes.append(f"quick: no micro-batcher sweep ({setting})")
    else:
        setting = batcher_sweep.sweep(dep, fixed, seconds)
    return serving_harness.measure_end_to_end(dep, setting, seconds, quick)


def goodput_over_usual(goodput_rps: float, usual_rps: float) -> dict:
    """The end-to-end goodput over the usual way's req/s, both from this run."""
    return {"goodput_over_usual": round(goodput_rps / usual_rps, 1), "goodput_over_usual_basis": GOODPUT_OVER_USUAL_BASIS}


# ---- main --------------------------------------------------------------------------------------

def emit_json(result: dict, json_out: Path | None) -> None:
    """The run's last stdout line, and the same line in json_out when given."""
    line = json.dumps(result)
    if json_out:
        json_out.write_text(line + "\n")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The JSON line's e2e_goodput_rps is the most req/s served with p99 <= 50 ms (open-loop offered rate "
               "stepped); goodput_over_usual divides it by usual_rps, the usual way's req/s in this run "
               "(transformers generate in process, one request at a time, no HTTP or Redis).")
    parser.add_argument("--bundle", help="bundle dir; default: the newest under models/")
    parser.add_argument("--quick", action="store_true", help="about 90 s: fewer points, no 10M catalog, no sweep")
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
        cfg = bundle.manifest.model.get("config", {})
        log(f"model: d_model {cfg.get('d_model')}, layers {cfg.get('encoder_layers')}+{cfg.get('decoder_layers')}, "
            f"d_ff {cfg.get('d_ff')}, heads {cfg.get('n_heads')}; items {bundle.num_items}, levels {bundle.levels}, "
            f"beam {bundle.beam_size}, k {K}, history {HISTORY}")

        # Redis starts now and idles until the end-to-end section (startup overlaps the rest).
        redis_proc, redis_port = serving_harness.start_redis(work)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"

        if args.providers == "cuda":
            result = engine_micro.engine_on_cuda(args, bundle, rng)
            if None in (args.engine_workers, args.max_batch_size, args.max_wait_ms):
                notes.append("cuda: no end-to-end section; give --engine-workers, --max-batch-size and --max-wait-ms "
                             "(the sweep's grid is sized for CPU cores)")
            else:
                e2e = end_to_end(args, bundle, served, redis_url, work, quick, rng, notes)
                result |= e2e | goodput_over_usual(e2e["e2e_goodput_rps"], result["usual_rps"])
            emit_json(result | {"seconds": round(time.perf_counter() - t_start, 1), "notes": notes}, args.json_out)
            return 0

        # ---- the engine alone, against the bundle's own graphs, and the usual way
        histories = random_histories(bundle.num_items, 512, rng)
        engine_rows, engine, engine_per_core = engine_micro.engine_alone(bundle, histories, "cpu", args.threads, quick)
        if not quick and served != source:
            own = OnnxBeamEngine(load_bundle(source), providers="cpu", intra_op_threads=args.threads)
            for b in (1, 32):
                mine = engine_micro.time_engine(engine, histories, b, 2.0)
                theirs = engine_micro.time_engine(own, histories, b, 2.0)
                engine_rows.append({"batch": b, "graph": "bundle's own (before)", **{k: theirs[k] for k in ("rps", "p50_ms", "p99_ms")},
                                    "vs_current": mine["rps"] / theirs["rps"]})
            del own
        usual_row, best = engine_micro.against_the_usual_way(bundle, histories, engine_rows, args, "cpu")

        # ---- compute bound
        bound = engine_micro.compute_bound(bundle, histories, engine_rows, engine, engine_per_core, args.threads, quick)
        del engine, engine_per_core

        # ---- trie scaling
        sizes = [10_000, 100_000, 1_000_000] if quick else [10_000, 100_000, 1_000_000, 10_000_000]
        if quick:
            notes.append("quick: the 10M catalog is left out (step_time_ratio and bytes/item use 1M)")
        scaling = engine_micro.trie_scaling(bundle, sizes, work, args.threads, quick, rng)
        table("Trie scaling (synthetic catalogs, the bundle's levels and codebook sizes; layout D = dense rows, C = padded CSR; step = gather (+ scatter on C) + "
              "top-k for 32 requests x beam, median)", scaling)
        if not scaling:
            notes.append("no synthetic catalog fits this bundle's codebooks: trie scaling skipped")
        small = scaling[0] if scaling else None
        large = scaling[-1] if scaling else None

        # ---- end to end: real service process + Redis
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
            **goodput_over_usual(e2e["e2e_goodput_rps"], usual_row["rps"]),
            **e2e,
            **engine_micro.scaling_json(small, large),
            **bound,
            "seconds": round(time.perf_counter() - t_start, 1),
            "notes": notes,
        }
        emit_json(result, args.json_out)
        return 0
    finally:
        serving_harness.stop(redis_proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
