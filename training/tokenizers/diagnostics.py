"""Code quality beyond usage and collisions: do items that share a code prefix look alike to the
collaborative model? (LETTER's diagnostic: codes that group co-purchased items make the
recommender's first decision an easier one.)"""
from __future__ import annotations

import numpy as np

from training.tokenizers.base import unit_rows


def mean_pair_cosine(vectors: np.ndarray, groups: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct items in the same group (exact: per group the sum of
    pairwise dot products of unit vectors is |sum|^2 - n)."""
    unit = unit_rows(vectors).astype(np.float64)
    _, group = np.unique(groups, return_inverse=True)
    sums = np.zeros((group.max() + 1, unit.shape[1]))
    np.add.at(sums, group, unit)
    counts = np.bincount(group).astype(np.float64)
    pairs = (counts * (counts - 1)).sum()
    return float(((sums**2).sum(1) - counts).sum() / pairs) if pairs else float("nan")


def code_neighbour_similarity(raw_codes: np.ndarray, collaborative: np.ndarray) -> dict[str, float]:
    """Mean collaborative cosine of items sharing their first code, and of any two items."""
    raw_codes = np.asarray(raw_codes)
    return {
        "first_code_pair_cosine": mean_pair_cosine(collaborative, raw_codes[:, 0]),
        "random_pair_cosine": mean_pair_cosine(collaborative, np.zeros(len(raw_codes), dtype=np.int64)),
    }
