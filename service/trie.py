"""Valid semantic IDs as a trie: fixed-width arrays for the graph, a plain dict trie as reference.

Layout (after STATIC's sparse-transition trie): nodes of each depth are numbered in code order;
`offsets[d]` gives the id of each depth-d node's first child at depth d + 1, so the child in slot
j is offset + j. Each depth has one table that a decode step reads with one fixed-width gather:

- padded CSR, `codes[d]` (nodes_d, W_d) int32: each node's child codes in ascending order,
  padded with -1; W_d is the largest fan-out at that depth;
- dense rows, `dense_slots(d)` (nodes_d, C_d + 1) int16, C_d = largest code + 1: column c + 1
  holds the slot of code c among the node's children, -1 where code c is no child (column 0 is
  always -1). A step then needs no search or scatter, and costs what the codebook costs, not
  what the catalog costs.

The leading depths whose dense table stays small whatever the catalog (at most
DENSE_ENTRIES_LIMIT entries: the product of the code bounds up to that depth) take dense rows, the
deeper ones padded CSR: for 256 x 256 x 256 codes plus a collision level, 3 dense depths and 1 CSR
depth, about 34 bytes per item at 10M items. The exported graph reads the layout of each depth
from its input's type (int16: dense rows, int32: CSR; graphs exported before dense rows existed
take int32 everywhere), so the engine always feeds what the graph expects. Leaves (depth L) are
the items in code order; `leaf_items` maps them back to item indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE_ENTRIES_LIMIT = 1 << 25  # a dense depth never holds more than this many int16 entries (64 MiB)


@dataclass(frozen=True)
class TrieArrays:
    codes: list[np.ndarray]  # per depth: (nodes_d, W_d) int32 child codes, ascending, -1 padded
    offsets: list[np.ndarray]  # per depth: (nodes_d,) int32
    leaf_items: np.ndarray  # (N,) int32
    code_bounds: list[int]  # per depth: largest code + 1

    @property
    def levels(self) -> int:
        return len(self.codes)

    @property
    def widths(self) -> list[int]:
        """The fixed CSR gather width of each depth."""
        return [int(c.shape[1]) for c in self.codes]

    @property
    def default_dense_levels(self) -> int:
        """How many leading depths take dense rows: those whose table is bounded by
        DENSE_ENTRIES_LIMIT entries for any catalog with these code bounds."""
        nodes = 1  # the most nodes a depth can have: the product of the code bounds above it
        for depth, bound in enumerate(self.code_bounds):
            if nodes * (bound + 1) > DENSE_ENTRIES_LIMIT or bound > np.iinfo(np.int16).max:
                return depth
            nodes *= bound
        return self.levels

    def dense_slots(self, depth: int) -> np.ndarray:
        """(nodes_d, C_d + 1) int16: column c + 1 is the slot of code c, -1 where it is no child."""
        codes = self.codes[depth]
        if self.code_bounds[depth] > np.iinfo(np.int16).max:
            raise ValueError(f"depth {depth}: codes up to {self.code_bounds[depth] - 1} do not fit dense int16 rows")
        table = np.full((len(codes), self.code_bounds[depth] + 1), -1, dtype=np.int16)
        rows, slots = np.nonzero(codes >= 0)
        table[rows, codes[rows, slots] + 1] = slots
        return table

    def feeds_for(self, dense: list[bool]) -> dict[str, np.ndarray]:
        """The graph inputs, depth d as dense rows where dense[d], else as padded CSR."""
        feeds = {f"trie_codes_{d}": self.dense_slots(d) if dense[d] else c for d, c in enumerate(self.codes)}
        feeds.update({f"trie_offsets_{d}": o for d, o in enumerate(self.offsets)})
        feeds["trie_leaf_items"] = self.leaf_items
        return feeds

    def as_feeds(self, dense_levels: int | None = None) -> dict[str, np.ndarray]:
        """The graph inputs, the first dense_levels depths (default: default_dense_levels) dense."""
        dense = self.default_dense_levels if dense_levels is None else dense_levels
        return self.feeds_for([d < dense for d in range(self.levels)])

    @property
    def nbytes(self) -> int:
        """Bytes of the default graph inputs."""
        return sum(a.nbytes for a in self.as_feeds().values())


def _sorted_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, rows in lexicographic order, differs) with differs[i, d] true where sorted row i's
    code at level d differs from row i-1's (row 0 differs everywhere)."""
    bits = [max(int(top), 1).bit_length() for top in ids.max(axis=0)]
    if sum(bits) <= 62:  # pack each row into one int64 key: one argsort instead of a multi-key lexsort
        key = np.zeros(len(ids), dtype=np.int64)
        for level, width in enumerate(bits):
            key <<= width
            key |= ids[:, level]
        order = np.argsort(key)  # keys of distinct rows differ, so any sort gives the one order
    else:
        order = np.lexsort(ids.T[::-1])  # lexicographic by level 0, then 1, ...
    sorted_ids = ids[order]
    differs = np.ones(ids.shape, dtype=bool)
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=differs[1:])
    return order, sorted_ids, differs


def _check_shape_and_range(semantic_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(semantic_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"semantic ids must be a non-empty (items, levels) array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise ValueError("semantic ids must be non-negative integers")
    if ids.max() > np.iinfo(np.int32).max:
        raise ValueError("semantic ids must fit in int32")
    return ids


def _raise_if_duplicates(differs: np.ndarray) -> None:
    if not differs.any(axis=1).all():  # a sorted row equal to its predecessor in every level
        raise ValueError("semantic ids must be unique per item (add a collision level)")


def validate_semantic_ids(semantic_ids: np.ndarray) -> np.ndarray:
    ids = _check_shape_and_range(semantic_ids)
    _raise_if_duplicates(_sorted_rows(ids)[2])
    return ids.astype(np.int64, copy=False)


def build_trie(semantic_ids: np.ndarray) -> TrieArrays:
    """Vectorised build: one lexicographic sort, then per depth a few array passes (no per-item loop)."""
    ids = _check_shape_and_range(semantic_ids)
    n_items, levels = ids.shape
    if n_items > np.iinfo(np.int32).max:
        raise ValueError("at most 2**31 - 1 items")
    order, sorted_ids, differs = _sorted_rows(ids)
    _raise_if_duplicates(differs)
    prefix_changes = np.logical_or.accumulate(differs, axis=1)  # (N, L): prefix of length d+1 differs

    codes: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    parent_of_item = np.zeros(n_items, dtype=np.int32)  # depth-d node on each sorted item's path
    for d in range(levels):
        first = np.flatnonzero(prefix_changes[:, d])  # first sorted item of each depth-(d+1) node
        child_parent = parent_of_item[first]  # (nodes_{d+1},) parents, non-decreasing
        n_parents = int(parent_of_item[-1]) + 1
        fanout = np.bincount(child_parent, minlength=n_parents)
        offset = np.zeros(n_parents, dtype=np.int64)
        np.cumsum(fanout[:-1], out=offset[1:])
        table = np.full((n_parents, int(fanout.max())), -1, dtype=np.int32)
        slot = np.arange(len(first), dtype=np.int64) - offset[child_parent]
        table[child_parent, slot] = sorted_ids[first, d]
        codes.append(table)
        offsets.append(offset.astype(np.int32))
        parent_of_item = (np.cumsum(prefix_changes[:, d], dtype=np.int64) - 1).astype(np.int32)
    code_bounds = [int(b) + 1 for b in ids.max(axis=0)]
    return TrieArrays(codes=codes, offsets=offsets, leaf_items=order.astype(np.int32), code_bounds=code_bounds)


class PrefixTrie:
    """The obviously correct twin: nested dicts, one per prefix."""

    def __init__(self, semantic_ids: np.ndarray) -> None:
        ids = validate_semantic_ids(semantic_ids)
        self.levels = ids.shape[1]
        self._root: dict = {}
        for item, row in enumerate(ids.tolist()):
            node = self._root
            for code in row[:-1]:
                node = node.setdefault(code, {})
            node[row[-1]] = item

    def _node(self, prefix: tuple[int, ...]) -> dict:
        node = self._root
        for code in prefix:
            node = node[code]
        return node

    def children(self, prefix: tuple[int, ...]) -> list[int]:
        if len(prefix) >= self.levels:
            return []
        try:
            return sorted(self._node(prefix))
        except KeyError:
            return []

    def item_at(self, codes: tuple[int, ...]) -> int:
        if len(codes) != self.levels:
            raise KeyError(codes)
        return self._node(codes[:-1])[codes[-1]]
