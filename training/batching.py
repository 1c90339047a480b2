"""Batches of user sequences and padded histories, shared by the generative recommender and SASRec."""
from __future__ import annotations

import numpy as np
import torch

from training.model import Seq2SeqConfig


def pad_histories(
    histories: list[np.ndarray], semantic_ids: np.ndarray, max_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad the most recent `max_history` items -> codes (B, H, L) int64, mask (B, H) bool,
    items (B, H) int64 (padding = the catalog size, the item embeddings' padding row)."""
    width = max(1, min(max_history, max((len(h) for h in histories), default=1)))
    codes = np.zeros((len(histories), width, semantic_ids.shape[1]), dtype=np.int64)
    mask = np.zeros((len(histories), width), dtype=bool)
    items = np.full((len(histories), width), len(semantic_ids), dtype=np.int64)
    for row, history in enumerate(histories):
        recent = np.asarray(history[-width:], dtype=np.int64)
        if len(recent):
            codes[row, width - len(recent) :] = semantic_ids[recent]
            mask[row, width - len(recent) :] = True
            items[row, width - len(recent) :] = recent
    return codes, mask, items


def history_tensors(
    cfg: Seq2SeqConfig, codes: np.ndarray, mask: np.ndarray, items: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, ...]:
    """pad_histories' arrays -> the tensors the model's graphs take (cfg.history_inputs), in order."""
    arrays = {"history_codes": codes, "history_mask": mask, "history_items": items}
    return tuple(torch.as_tensor(arrays[name], device=device) for name in cfg.history_inputs)


def sequence_batches(sequences: list[np.ndarray], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar length, so padding stays small."""
    order = rng.permutation(len(sequences))
    chunk = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: len(sequences[i]))
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return batches


def collate_sequences(
    sequences: list[np.ndarray], semantic_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded item codes (B, T, L), mask (B, T) and item indices (B, T), padding = catalog size."""
    t = max(len(s) for s in sequences)
    items = torch.full((len(sequences), t), len(semantic_ids), dtype=torch.long)
    mask = torch.zeros(len(sequences), t, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        items[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = True
    return semantic_ids[items.masked_fill(~mask, 0)], mask, items
