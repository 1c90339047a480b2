"""Offline evaluation: a ranker turns histories into top items; `evaluate` scores them (Recall/NDCG).

The generative recommender ranks with the same constrained beam search module that is exported
and served (training/beam.py), so what is measured offline is what is served.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from service.trie import build_trie
from training.batching import history_tensors, pad_histories
from training.beam import ConstrainedBeamSearch, trie_tensors
from training.metrics import topk_metrics

Ranker = Callable[[list[np.ndarray]], np.ndarray]  # histories -> (U, >= 10) item indices, best first


def evaluate(ranker: Ranker, histories: list[np.ndarray], targets: np.ndarray) -> dict[str, float]:
    return topk_metrics(ranker(histories), np.asarray(targets))


@torch.no_grad()
def recommend_topk(
    model,
    histories: list[np.ndarray],
    semantic_ids: np.ndarray,
    beam_size: int,
    batch_size: int = 512,
    device: str = "cpu",
    use_item_head: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Constrained beam search over the whole catalog -> item indices and scores (U, beam).
    use_item_head=False ranks by the codes alone even when the model has an item head."""
    was_training = model.training
    model.eval()
    search = ConstrainedBeamSearch(model, beam_size, use_item_head)
    trie = trie_tensors(build_trie(semantic_ids).as_feeds(), model.cfg.levels, device)
    # Similar lengths together: less padding, same results.
    order = np.argsort([len(h) for h in histories], kind="stable")
    items = np.full((len(histories), beam_size), -1, dtype=np.int64)
    scores = np.zeros((len(histories), beam_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        padded = pad_histories([histories[i] for i in rows], semantic_ids, model.cfg.max_history)
        out_items, out_scores = search(*history_tensors(model.cfg, *padded, device=device), *trie)
        items[rows], scores[rows] = out_items.cpu().numpy(), out_scores.float().cpu().numpy()
    model.train(was_training)
    return items, scores


def beam_ranker(model, semantic_ids: np.ndarray, beam_size: int, device: str = "cpu", use_item_head: bool = True) -> Ranker:
    """The generative recommender's ranker: its constrained beam search over `semantic_ids`."""
    return lambda histories: recommend_topk(model, histories, semantic_ids, beam_size, device=device,
                                            use_item_head=use_item_head)[0]
