"""Non-learned floors under the same protocol: the most popular items, and a first-order item
transition model (the items that most often followed the history's last item in training).

They say how much of a split is popularity and plain item-to-item succession, which a sequential
model should at least match, and they measure the drift between the splits: the same baseline
scores lower on test than on validation when the test targets are rarer items.

    python -m training.baselines --dataset beauty

Prints a markdown table and, last, one JSON line with both baselines on valid and test.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial

import numpy as np

from training.data import Splits, item_popularity, leave_one_out, load_dataset
from training.evaluation import evaluate
from training.metrics import topk_metrics
from training.splits import by_target_popularity

TOP_K = 10


def transition_counts(train_sequences: list[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of how often item b directly followed item a in training: (row_start, successor, count),
    each row's successors sorted by count, ties by overall popularity."""
    pairs = [np.stack([s[:-1], s[1:]], axis=1) for s in train_sequences if len(s) >= 2]
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    keys, counts = np.unique(pairs[:, 0] * n_items + pairs[:, 1], return_counts=True)
    source, successor = keys // n_items, keys % n_items
    popularity = item_popularity(train_sequences, n_items)
    order = np.lexsort((-popularity[successor], -counts, source))  # by source, then count, then popularity
    source, successor, counts = source[order], successor[order], counts[order]
    row_start = np.searchsorted(source, np.arange(n_items + 1))
    return row_start, successor, counts


def successor_lists(train_sequences: list[np.ndarray], n_items: int, list_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's `list_size` most frequent successors (transition_counts' order) as CSR:
    (offsets (N + 1,), successors) for the bundle's transition fusion (service/fusion.py)."""
    row_start, successor, _ = transition_counts(train_sequences, n_items)
    keep = np.arange(len(successor)) - np.repeat(row_start[:-1], np.diff(row_start)) < list_size
    offsets = np.concatenate([[0], np.cumsum(np.minimum(np.diff(row_start), list_size))])
    return offsets.astype(np.int64), successor[keep].astype(np.int64)


@dataclass(frozen=True)
class Floors:
    """What both floors read from the training split, counted once and scored on any histories."""

    popular: np.ndarray  # (N,) every item, most training interactions first
    row_start: np.ndarray  # (N + 1,) transition CSR (transition_counts)
    successor: np.ndarray

    @classmethod
    def from_train(cls, train_sequences: list[np.ndarray], n_items: int) -> Floors:
        row_start, successor, _ = transition_counts(train_sequences, n_items)
        popular = np.argsort(-item_popularity(train_sequences, n_items), kind="stable")
        return cls(popular, row_start, successor)

    def most_popular(self, histories: list[np.ndarray], k: int = TOP_K) -> np.ndarray:
        """(U, k): the k most popular items, the same for every user."""
        return np.broadcast_to(self.popular[:k], (len(histories), min(k, len(self.popular)))).copy()

    def last_item_transitions(self, histories: list[np.ndarray], k: int = TOP_K) -> np.ndarray:
        """(U, k): the most frequent successors of each history's last item, then the most popular items."""
        head = self.popular[: 2 * k]  # k fillers are always among the 2k most popular
        out = np.empty((len(histories), k), dtype=np.int64)
        for u, history in enumerate(histories):
            last = int(history[-1])
            ranked = self.successor[self.row_start[last] : self.row_start[last + 1]][:k]
            if len(ranked) < k:
                ranked = np.concatenate([ranked, head[~np.isin(head, ranked)][: k - len(ranked)]])
            out[u] = ranked
        return out


BASELINES = {"most popular": Floors.most_popular, "last-item transitions": Floors.last_item_transitions}


def evaluate_baselines(splits: Splits, n_items: int) -> dict[str, dict[str, dict[str, float]]]:
    """{baseline: {"valid": metrics, "test": metrics, "test_by_popularity": {group: metrics}}}, full
    ranking over the catalog; the test figures also by the target's training interactions (the long tail)."""
    floors = Floors.from_train(splits.train_sequences, n_items)
    out = {}
    for name, topk in BASELINES.items():
        test_ranked = topk(floors, splits.test_histories)
        out[name] = {
            "valid": evaluate(partial(topk, floors), splits.valid_histories, splits.valid_targets),
            "test": topk_metrics(test_ranked, splits.test_targets),
            "test_by_popularity": by_target_popularity(test_ranked, splits.test_targets, splits.train_sequences, n_items),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="beauty", help="beauty, scientific or a dataset folder")
    parser.add_argument("--max-history", type=int, default=20)
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset)
    results = evaluate_baselines(leave_one_out(dataset, args.max_history), dataset.n_items)
    keys = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
    print("| baseline | split | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
    for name, row in results.items():
        for split in ("valid", "test"):
            print(f"| {name} | {split} | " + " | ".join(f"{row[split][key]:.4f}" for key in keys) + " |")
    print(json.dumps({"dataset": dataset.name, "baselines": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
