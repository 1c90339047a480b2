"""Shared tokenizer interface, fit report and the collision level that makes semantic IDs unique."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import nn


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


VIEWS = ("text", "collaborative", "text+collaborative")


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class ItemViews:
    """What is known of each item, one matrix per view, rows in dataset item order. Text
    embeddings put items with similar descriptions together; collaborative ones (SASRec's item
    table, fitted on the same training split) put items bought by the same people together."""
    text: np.ndarray | None = None  # (N, D_text)
    collaborative: np.ndarray | None = None  # (N, D_cf)
    collaborative_weight: float = 1.0  # the collaborative half's scale in "text+collaborative"

    @property
    def n_items(self) -> int:
        view = self.text if self.text is not None else self.collaborative
        if view is None:
            raise ValueError("no view of the items was given")
        return len(view)

    def matrix(self, view: str) -> np.ndarray:
        """(N, D) float32 for one of VIEWS: "collaborative" is L2-normalised per item;
        "text+collaborative" concatenates both L2-normalised, the collaborative half scaled."""
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; known: {list(VIEWS)}")
        if "text" in view.split("+") and self.text is None:
            raise ValueError(f"view {view!r} needs the items' text embeddings")
        if "collaborative" in view and self.collaborative is None:
            raise ValueError(f"view {view!r} needs the items' collaborative embeddings")
        if view == "text":
            return np.asarray(self.text, dtype=np.float32)
        if view == "collaborative":
            return unit_rows(self.collaborative)
        return np.concatenate([unit_rows(self.text), self.collaborative_weight * unit_rows(self.collaborative)], axis=1)


@runtime_checkable
class ItemTokenizer(Protocol):
    kind: str
    params: dict[str, Any]  # JSON-able, written to the manifest; enough to rebuild the tokenizer
    input_view: str  # the view encode() reads (VIEWS)
    views: set[str]  # every view fit() reads ("text", "collaborative")

    def fit(self, views: ItemViews, seed: int) -> FitReport: ...

    def encode(self, views: ItemViews) -> np.ndarray:  # (N, levels) int64, no collision level
        ...

    def state_dict(self) -> dict[str, np.ndarray]:  # saved as safetensors in the bundle
        ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class TrainableTokenizer(Protocol):
    """The optional trainable form of a tokenizer, for training it beside the recommender
    (training/train.py): a torch module over the fitted catalog's items."""
    module: nn.Module  # its parameters train in the "tokenizer" group; it provides:
    # latents(items (M,) item indices) -> (M, d); code_log_probs(latents, temperature) -> per
    # level (M, K) log softmax(-squared distance / temperature) to that level's codes (along the
    # residual path of the latent's own codes); reconstruct(latents) -> (M, D_in) through the
    # quantizer; loss(items) -> the tokenizer's own loss on those items.

    def encode_catalog(self, previous: np.ndarray | None = None) -> np.ndarray:
        """(N, levels) int64 raw codes of every item with the current weights; `previous`: the codes
        they replace, which a tokenizer may keep where the new ones are barely closer."""
        ...


class MatrixTokenizer:
    """A tokenizer that fits one matrix, the view `input_view`: subclasses implement fit_matrix
    and encode_matrix."""
    input_view = "text"

    @property
    def views(self) -> set[str]:
        """The item views fit() reads."""
        return set(self.input_view.split("+"))

    def fit(self, views: ItemViews, seed: int) -> FitReport:
        return self.fit_matrix(views.matrix(self.input_view), seed)

    def encode(self, views: ItemViews) -> np.ndarray:
        return self.encode_matrix(views.matrix(self.input_view))


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
    extra_level_size: int  # codebook size of the collision level: its capacity, else max(max_group_size, 1)
    codebook_sizes: list[int]  # raw levels + the collision level

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CollisionOverflow(ValueError):
    """More items share one code tuple than the collision level's fixed capacity."""


def assign_semantic_ids(
    raw_codes: np.ndarray, codebook_sizes: list[int] | None = None, collision_capacity: int | None = None,
    arrival_order: np.ndarray | None = None,
) -> tuple[np.ndarray, SemanticIdReport]:
    """Appends a collision level: the k-th item (in item order, or in `arrival_order`: a
    permutation of the items, e.g. known items before new ones so a new item never renumbers a
    known one) on a raw tuple gets code k.

    raw_codes: (N, L) int; codebook_sizes defaults to max code + 1 per level. collision_capacity
    fixes the collision level's codebook size (codes refreshed during training must fit the model
    built for the first ones); None sizes it to the largest group.
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
    # Rank within group in arrival order: stable sort by group, then position minus group start.
    arrival = np.arange(n) if arrival_order is None else np.asarray(arrival_order, dtype=np.int64)
    order = arrival[np.argsort(group[arrival], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[group[order]]

    codes = np.concatenate([raw, rank[:, None]], axis=1)
    max_group = int(counts.max())
    if collision_capacity is not None and max_group > collision_capacity:
        raise CollisionOverflow(f"{max_group} items share one code tuple, more than the collision level's capacity "
                         f"{collision_capacity}: raise collision_capacity")
    extra_level_size = max(max_group, 1) if collision_capacity is None else collision_capacity
    used = [len(np.unique(raw[:, j])) for j in range(levels)]
    report = SemanticIdReport(
        codes_used=used,
        code_usage=[u / s for u, s in zip(used, sizes)],
        collisions_before_separation=int(counts[counts > 1].sum()),
        n_colliding_groups=int((counts > 1).sum()),
        max_group_size=max_group,
        extra_level_size=extra_level_size,
        codebook_sizes=[*sizes, extra_level_size],
    )
    return codes, report


class CatalogCodes:
    """The catalog's semantic IDs while a recommender trains: the tokenizer's raw codes plus the
    collision level. The codebook sizes (the collision level's capacity included) are fixed at the
    first assignment, so codes refreshed by a tokenizer that keeps training fit the same model."""

    def __init__(self, raw_codes: np.ndarray, raw_codebook_sizes: list[int], collision_capacity: int | None = None,
                 arrival_order: np.ndarray | None = None) -> None:
        self.raw_codebook_sizes = list(raw_codebook_sizes)
        self.arrival_order = arrival_order  # the order items take collision codes in (None: item order)
        self.semantic_ids, self.report = assign_semantic_ids(raw_codes, self.raw_codebook_sizes, collision_capacity,
                                                             arrival_order)
        self.collision_capacity = self.report.extra_level_size
        self.refreshes = 0

    @property
    def codebook_sizes(self) -> list[int]:
        return self.report.codebook_sizes

    def refresh(self, raw_codes: np.ndarray) -> SemanticIdReport:
        """New raw codes for every item (same codebooks); returns the new assignment's report."""
        self.semantic_ids, self.report = assign_semantic_ids(raw_codes, self.raw_codebook_sizes, self.collision_capacity,
                                                             self.arrival_order)
        self.refreshes += 1
        return self.report
