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
from training.model import NEG
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


@torch.no_grad()
def unconstrained_topk(model, histories: list[np.ndarray], semantic_ids: np.ndarray, beam_size: int,
                       batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Beam search over every code tuple, no trie, as ETEGRec's released code evaluates: a generated
    tuple that is no item's semantic ID is a miss (-1). Ranks by the codes alone. -> (U, beam)."""
    was_training = model.training
    model.eval()
    item_of = {tuple(row): item for item, row in enumerate(np.asarray(semantic_ids).tolist())}
    sizes = model.cfg.codebook_sizes
    out = np.full((len(histories), beam_size), -1, dtype=np.int64)
    for start in range(0, len(histories), batch_size):
        padded = pad_histories(histories[start : start + batch_size], semantic_ids, model.cfg.max_history)
        inputs = history_tensors(model.cfg, *padded, device=device)
        memory = model.encode(*inputs)  # (B, H, D)
        b = memory.shape[0]
        bias = torch.zeros(inputs[1].shape, device=memory.device).masked_fill(~inputs[1], NEG)[:, None, None, :]
        kv = model.cross_keys_values(memory)
        prefix = torch.zeros(b, 1, 0, dtype=torch.long, device=memory.device)  # (B, k, level)
        scores = torch.zeros(b, 1, device=memory.device)
        for level, size in enumerate(sizes):
            k = prefix.shape[1]
            rows = torch.arange(b, device=memory.device).repeat_interleave(k)
            hidden = model.decode(prefix.reshape(b * k, level), memory[rows, -1],
                                  [(key[rows], value[rows]) for key, value in kv], bias[rows], groups=1)
            log_probs = model.level_log_probs(hidden[:, -1], level)[:, :size].float().reshape(b, k, size)
            scores, chosen = (scores[..., None] + log_probs).reshape(b, k * size).topk(min(beam_size, k * size), dim=1)
            parent = torch.div(chosen, size, rounding_mode="floor")
            prefix = torch.cat([prefix.gather(1, parent[..., None].expand(-1, -1, level)), (chosen % size)[..., None]], -1)
        for row, tuples in enumerate(prefix.cpu().numpy().tolist()):
            out[start + row, : len(tuples)] = [item_of.get(tuple(codes), -1) for codes in tuples]
    model.train(was_training)
    return out


def beam_ranker(model, semantic_ids: np.ndarray, beam_size: int, device: str = "cpu", use_item_head: bool = True,
                constrained: bool = True) -> Ranker:
    """The generative recommender's ranker: its constrained beam search over `semantic_ids`
    (constrained=False: the unconstrained search, codes alone)."""
    if not constrained:
        return lambda histories: unconstrained_topk(model, histories, semantic_ids, beam_size, device=device)
    return lambda histories: recommend_topk(model, histories, semantic_ids, beam_size, device=device,
                                            use_item_head=use_item_head)[0]
