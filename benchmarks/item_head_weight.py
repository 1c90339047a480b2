"""How much should the item head count? Ranks one beam search's items (codes alone) by codes +
w * item head log-probability for several w, on validation and test users of a bundle whose model
has an item head; also prints recall@beam, the most any re-ranking of the beam could reach.

    make bench-item-head-weight BUNDLE=models/<name>/<version>
    python benchmarks/item_head_weight.py --bundle models/<name>/<version> [--users 4000] [--weights 0 0.5 1 2 4]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.bundle import load_bundle  # noqa: E402
from training.batching import history_tensors, pad_histories  # noqa: E402
from training.data import leave_one_out, load_dataset  # noqa: E402
from training.evaluation import recommend_topk  # noqa: E402
from training.export import load_recommender  # noqa: E402
from training.metrics import topk_metrics  # noqa: E402


@torch.no_grad()
def item_log_probs_of(model, histories: list[np.ndarray], semantic_ids: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(U, k): the item head's log-probability of each found item (-inf where no item)."""
    out = np.full(items.shape, -np.inf, dtype=np.float64)
    for start in range(0, len(histories), 512):
        rows = slice(start, start + 512)
        history = history_tensors(model.cfg, *pad_histories(histories[rows], semantic_ids, model.cfg.max_history))
        log_probs = model.item_log_probs(model.encode(*history)[:, -1]).numpy()
        found = items[rows]
        out[rows] = np.where(found >= 0, np.take_along_axis(log_probs, np.maximum(found, 0), 1), -np.inf)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--dataset", default=None, help="defaults to the bundle's dataset")
    parser.add_argument("--users", type=int, default=4000, help="sampled users (seeded); 0 = all")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    model = load_recommender(args.bundle)
    if not model.cfg.item_head:
        parser.error(f"{args.bundle}: this model has no item head (model.item_head)")
    dataset = load_dataset(args.dataset or bundle.dataset)
    splits = leave_one_out(dataset, max_history=bundle.max_history)
    index = np.array([bundle.index_of[i] for i in dataset.item_ids])  # dataset index -> bundle index
    semantic_ids = bundle.semantic_ids.astype(np.int64)
    n_users = len(splits.test_targets)
    users = np.arange(n_users) if not args.users else np.sort(
        np.random.default_rng(0).choice(n_users, min(args.users, n_users), replace=False))
    report: dict = {"bundle": str(args.bundle), "users": len(users), "beam": bundle.beam_size}
    for split, split_histories, split_targets in (("valid", splits.valid_histories, splits.valid_targets),
                                                  ("test", splits.test_histories, splits.test_targets)):
        histories = [index[split_histories[u]] for u in users]
        targets = index[split_targets[users]]
        items, code_scores = recommend_topk(model, histories, semantic_ids, bundle.beam_size, use_item_head=False)
        item_log_probs = item_log_probs_of(model, histories, semantic_ids, items)
        rows = {"recall@beam": round(float((items == targets[:, None]).any(1).mean()), 4)}
        for weight in args.weights:
            combined = np.where(items >= 0, code_scores + weight * item_log_probs, -np.inf)
            order = np.argsort(-combined, axis=1, kind="stable")
            metrics = topk_metrics(np.take_along_axis(items, order, 1), targets)
            rows[f"w={weight:g}"] = {k: round(v, 4) for k, v in metrics.items()}
        report[split] = rows
        print(split, json.dumps(rows), flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
