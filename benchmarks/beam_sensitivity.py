"""Does a wider beam find better items? Scores a bundle's model (torch evaluator) on sampled test
users with several beam widths; equal metrics mean the search is not what limits quality.

    make bench-beam-sensitivity BUNDLE=models/<name>/<version>
    python benchmarks/beam_sensitivity.py --bundle models/beauty-rqkmeans/<version> [--users 4000] [--beams 10 20 50]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.bundle import load_bundle  # noqa: E402
from training.data import leave_one_out, load_dataset  # noqa: E402
from training.evaluation import beam_ranker, evaluate  # noqa: E402
from training.export import load_recommender  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--dataset", default=None, help="defaults to the bundle's dataset")
    parser.add_argument("--users", type=int, default=4000, help="sampled test users (seeded)")
    parser.add_argument("--beams", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    model = load_recommender(args.bundle)
    dataset = load_dataset(args.dataset or bundle.dataset)
    splits = leave_one_out(dataset, max_history=bundle.max_history)
    index = np.array([bundle.index_of[i] for i in dataset.item_ids])  # dataset index -> bundle index
    users = np.sort(np.random.default_rng(0).choice(len(splits.test_targets), min(args.users, len(splits.test_targets)),
                                                    replace=False))
    histories = [index[splits.test_histories[u]] for u in users]
    targets = index[splits.test_targets[users]]
    rows = []
    for beam in args.beams:
        started = time.perf_counter()
        metrics = evaluate(beam_ranker(model, bundle.semantic_ids.astype(np.int64), beam), histories, targets)
        rows.append({"beam": beam, **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    print(json.dumps({"bundle": str(args.bundle), "users": len(users), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
