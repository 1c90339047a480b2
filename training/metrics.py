"""Ranking metrics with one relevant item per user (Recall@K = HR@K, NDCG@K)."""
from __future__ import annotations

import numpy as np

CUTOFFS = (5, 10)


def topk_metrics(topk_items: np.ndarray, targets: np.ndarray, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float]:
    """topk_items: (U, K) item indices ranked best first (-1 for empty slots); targets: (U,)."""
    topk_items = np.asarray(topk_items)
    targets = np.asarray(targets).reshape(-1, 1)
    if topk_items.shape[0] != targets.shape[0]:
        raise ValueError(f"{topk_items.shape[0]} rankings for {targets.shape[0]} targets")
    hits = topk_items == targets  # (U, K)
    has_hit = hits.any(axis=1)
    rank = np.where(has_hit, hits.argmax(axis=1), np.iinfo(np.int64).max)  # 0-based
    out: dict[str, float] = {}
    for k in cutoffs:
        if topk_items.shape[1] < k:
            raise ValueError(f"need at least {k} ranked items for @{k}, got {topk_items.shape[1]}")
        within = rank < k
        out[f"recall@{k}"] = float(within.mean())
        gains = np.zeros(len(rank))
        gains[within] = 1.0 / np.log2(rank[within] + 2.0)
        out[f"ndcg@{k}"] = float(gains.mean())
    return out
