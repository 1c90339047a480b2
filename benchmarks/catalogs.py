"""Synthetic catalogs with a real bundle's levels and codebook sizes, for trie scaling.

The first L-1 levels are drawn uniformly; the last level is the collision level, as the pipeline
builds it: the rank of an item among the items sharing its first L-1 codes (0, 1, 2, ...), so
every row is unique and every code stays inside its codebook (rows whose rank would not fit are
drawn again).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def synthetic_semantic_ids(n_items: int, codebook_sizes: Sequence[int], seed: int = 0) -> np.ndarray:
    """(n_items, L) int32 unique code tuples."""
    sizes = [int(v) for v in codebook_sizes]
    rng = np.random.default_rng(seed)
    if len(sizes) == 1:
        if n_items > sizes[0]:
            raise ValueError(f"{n_items} items do not fit one level of {sizes[0]} codes")
        return rng.choice(sizes[0], size=n_items, replace=False).astype(np.int32)[:, None]
    prefix_sizes, last = sizes[:-1], sizes[-1]
    capacity = float(np.prod(prefix_sizes, dtype=np.float64)) * last
    if n_items > capacity:
        raise ValueError(f"{n_items} items do not fit codebooks {sizes}")
    strides = np.cumprod([1] + prefix_sizes[::-1][:-1])[::-1].astype(np.int64)  # mixed radix of the prefix
    prefix_space = int(np.prod(prefix_sizes, dtype=np.int64))
    draw = int(n_items * 1.1) + 16
    while True:
        keys = np.sort(rng.integers(0, prefix_space, size=draw, dtype=np.int64))
        run_start = np.r_[True, keys[1:] != keys[:-1]]
        first_of_run = np.maximum.accumulate(np.where(run_start, np.arange(draw), 0))
        rank = np.arange(draw) - first_of_run  # collision rank within equal prefixes
        fits = rank < last
        if fits.sum() >= n_items:
            break
        draw *= 2
    keep = rng.choice(np.flatnonzero(fits), size=n_items, replace=False)
    keys, rank = keys[keep], rank[keep]
    codes = np.empty((n_items, len(sizes)), dtype=np.int32)
    for level, stride in enumerate(strides):
        codes[:, level] = (keys // stride) % prefix_sizes[level]
    codes[:, -1] = rank
    return codes[rng.permutation(n_items)]
