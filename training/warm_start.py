"""Warm start: code embeddings, output heads and item embeddings started from the item features the
codes came from, instead of noise."""
from __future__ import annotations

import numpy as np
import torch

from training.model import GenerativeRecommender


def project_features(features: np.ndarray, d_model: int, seed: int, item_rms: float = 0.04) -> np.ndarray:
    """(N, F) -> (N, d_model): the features' leading principal directions (random orthonormal ones
    when the features are narrower than d_model), scaled to `item_rms` per coordinate."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    if x.shape[1] >= d_model:
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        z = x @ vt[:d_model].T
        z = np.pad(z, ((0, 0), (0, d_model - z.shape[1])))  # fewer items than d_model: fewer directions
    else:
        basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_model, x.shape[1])))
        z = x @ basis.T
    return z * (item_rms / max(float(np.sqrt((z**2).mean())), 1e-12))


def code_tables_from_features(
    features: np.ndarray, semantic_ids: np.ndarray, codebook_sizes: list[int], d_model: int, seed: int,
    item_rms: float = 0.04,
) -> list[np.ndarray]:
    """Per level a (V_l, d_model) table whose rows, summed along an item's codes, approximate the
    item's feature vector projected to d_model: level by level, each code's row is the mean of what
    the earlier levels left unexplained for its items (residual quantisation's centres, for any
    tokenizer, the collision level included). The projection keeps the features' leading principal
    directions (random orthonormal ones when the features are narrower than d_model); rows are
    scaled so an item's sum has `item_rms` per coordinate, about what random initialisation gives."""
    residual, tables = project_features(features, d_model, seed, item_rms), []
    for level, size in enumerate(codebook_sizes):
        codes = semantic_ids[:, level]
        sums = np.zeros((size, d_model))
        np.add.at(sums, codes, residual)
        counts = np.bincount(codes, minlength=size)[:, None]
        table = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        residual = residual - table[codes]
        tables.append(table.astype(np.float32))
    return tables


def warm_start_codes(model: GenerativeRecommender, tables: list[np.ndarray]) -> None:
    """Copies the tables into the code embeddings and the output heads (unused codes keep noise)."""
    with torch.no_grad():
        for level, table in enumerate(tables):
            rows = torch.as_tensor(table)
            used = rows.abs().sum(1) > 0
            for weight in (model.code_embeddings[level].weight, model.heads[level].weight):
                weight[used] = rows[used].to(weight.dtype)


def warm_start_items(model: GenerativeRecommender, features: np.ndarray, semantic_ids: np.ndarray,
                     tables: list[np.ndarray], seed: int) -> None:
    """Item embeddings start as what the code tables leave unexplained of each item's projected
    features, so an item's encoder input (codes' sum + its own row) begins as exactly that projection."""
    explained = sum(table[semantic_ids[:, level]] for level, table in enumerate(tables))
    residual = project_features(features, model.cfg.d_model, seed) - explained
    with torch.no_grad():
        weight = model.item_embeddings.weight
        weight[: len(residual)] = torch.as_tensor(residual, dtype=weight.dtype)
        weight[len(residual) :] = 0
