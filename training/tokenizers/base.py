"""Shared tokenizer interface, fit report and the collision level that makes semantic IDs unique."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class FitReport:
    kind: str
    seconds: float  # wall time of fit()
    n_items: int
    codebook_sizes: list[int]  # raw levels (no collision level)
    code_usage: list[float]  # per level: distinct codes used by the fitted items / codebook size
    unique_fraction: float  # distinct raw code tuples / items, before the collision level
    metrics: dict[str, float] = field(default_factory=dict)  # final losses etc.
    curve: list[dict[str, float]] = field(default_factory=list)  # periodic training log


@runtime_checkable
class ItemTokenizer(Protocol):
    kind: str
    params: dict[str, Any]  # JSON-able, written to the manifest; enough to rebuild the tokenizer

    def fit(self, embeddings: np.ndarray, seed: int) -> FitReport: ...

    def encode(self, embeddings: np.ndarray) -> np.ndarray:  # (N, levels) int64, no collision level
        ...

    def state_dict(self) -> dict[str, np.ndarray]:  # saved as safetensors in the bundle
        ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


def code_usage(codes: np.ndarray, codebook_sizes: list[int]) -> list[float]:
    """Per level: distinct codes used / codebook size."""
    codes = np.asarray(codes)
    return [len(np.unique(codes[:, level])) / size for level, size in enumerate(codebook_sizes)]


def unique_fraction(codes: np.ndarray) -> float:
    codes = np.asarray(codes)
    return len(np.unique(codes, axis=0)) / max(1, len(codes))


@dataclass
class SemanticIdReport:
    codes_used: list[int]  # per raw level, distinct codes
    code_usage: list[float]  # per raw level, codes_used / codebook size
    collisions_before_separation: int  # items that shared their full raw tuple with another item
    n_colliding_groups: int  # distinct raw tuples held by more than one item
    max_group_size: int  # most items on one raw tuple
    extra_level_size: int  # codebook size of the collision level = max(max_group_size, 1)
    codebook_sizes: list[int]  # raw levels + the collision level

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def assign_semantic_ids(
    raw_codes: np.ndarray, codebook_sizes: list[int] | None = None
) -> tuple[np.ndarray, SemanticIdReport]:
    """Appends a collision level: the k-th item (in item order) on a raw tuple gets code k.

    raw_codes: (N, L) int; codebook_sizes defaults to max code + 1 per level.
    Returns ((N, L+1) int64 unique rows, report)."""
    raw = np.asarray(raw_codes, dtype=np.int64)
    if raw.ndim != 2 or raw.shape[0] == 0:
        raise ValueError(f"raw_codes must be (N>0, L), got {raw.shape}")
    n, levels = raw.shape
    sizes = list(codebook_sizes) if codebook_sizes is not None else [int(raw[:, j].max()) + 1 for j in range(levels)]
    if len(sizes) != levels:
        raise ValueError(f"{len(sizes)} codebook sizes for {levels} levels")
    if (raw < 0).any() or any((raw[:, j] >= sizes[j]).any() for j in range(levels)):
        raise ValueError("codes out of range of their codebook")

    _, group, counts = np.unique(raw, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    # Rank within group in item order: stable sort by group, then position minus group start.
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[group[order]]

    codes = np.concatenate([raw, rank[:, None]], axis=1)
    max_group = int(counts.max())
    used = [len(np.unique(raw[:, j])) for j in range(levels)]
    report = SemanticIdReport(
        codes_used=used,
        code_usage=[u / s for u, s in zip(used, sizes)],
        collisions_before_separation=int(counts[counts > 1].sum()),
        n_colliding_groups=int((counts > 1).sum()),
        max_group_size=max_group,
        extra_level_size=max(max_group, 1),
        codebook_sizes=[*sizes, max(max_group, 1)],
    )
    return codes, report
