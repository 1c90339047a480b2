"""What item-head candidates cost the search: the same bundle with and without them, side by side.

    python benchmarks/item_head_candidates.py --bundle DIR [--candidates 20] [--dataset NAME_OR_FOLDER]

Copies the bundle, re-exports the copy with `--item-head-candidates N` (training/export.py), then times
`OnnxBeamEngine.search` on both over the same test histories, alternating them six times: one request
at a time (128 requests) and batches of 64 (512 requests), one onnxruntime thread each. Prints the
median seconds and the ratio; both engines' figures come from the same run, so a shared machine's
noise falls on both. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from service.bundle import load_bundle
from service.engine import OnnxBeamEngine
from training.data import leave_one_out, load_dataset
from training.export import reexport_graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--dataset", default=None, help="defaults to the bundle's dataset")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    plain = load_bundle(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, copy)
        reexport_graphs(copy, args.candidates)
        engines = {"plain": OnnxBeamEngine(plain, providers="cpu", intra_op_threads=1),
                   "candidates": OnnxBeamEngine(load_bundle(copy), providers="cpu", intra_op_threads=1)}
        dataset = load_dataset(args.dataset or plain.dataset)
        splits = leave_one_out(dataset, max_history=plain.max_history)
        index = np.array([plain.index_of[i] for i in dataset.item_ids])
        histories = [index[h] for h in splits.test_histories[:512]]
        result: dict[str, object] = {"bundle": str(args.bundle), "candidates": args.candidates}
        for batch, requests in ((1, 128), (64, 512)):
            seconds: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.repeats):
                for name, engine in engines.items():
                    started = time.perf_counter()
                    for start in range(0, requests, batch):
                        engine.search(histories[start : start + batch])
                    seconds[name].append(time.perf_counter() - started)
            median = {name: float(np.median(v)) for name, v in seconds.items()}
            ratio = median["candidates"] / median["plain"]
            print(f"batch {batch}: {requests} requests in {median['plain']:.3f} s plain, "
                  f"{median['candidates']:.3f} s with {args.candidates} candidates: {ratio:.2f}x")
            result[f"batch_{batch}"] = {"plain_s": round(median["plain"], 4),
                                        "candidates_s": round(median["candidates"], 4), "ratio": round(ratio, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
