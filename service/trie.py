"""Valid semantic IDs as a trie: fixed-width arrays for the graph, a plain dict trie as reference.

Layout (after STATIC's sparse-transition trie): nodes of each depth are numbered in code order;
depth d has a table `codes[d]` of shape (nodes_d, W_d) holding each node's child codes padded with
-1, and `offsets[d]` giving the id of its first child at depth d + 1, so child j is offset + j.
A decode step is then one fixed-width gather, whatever the catalog size. Leaves (depth L) are the
items in code order; `leaf_items` maps them back to item indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrieArrays:
    codes: list[np.ndarray]  # per depth: (nodes_d, W_d) int32, -1 padded
    offsets: list[np.ndarray]  # per depth: (nodes_d,) int32
    leaf_items: np.ndarray  # (N,) int32

    @property
    def levels(self) -> int:
        return len(self.codes)

    def as_feeds(self) -> dict[str, np.ndarray]:
        feeds = {f"trie_codes_{d}": c for d, c in enumerate(self.codes)}
        feeds.update({f"trie_offsets_{d}": o for d, o in enumerate(self.offsets)})
        feeds["trie_leaf_items"] = self.leaf_items
        return feeds

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.as_feeds().values())


def validate_semantic_ids(semantic_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(semantic_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"semantic ids must be a non-empty (items, levels) array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise ValueError("semantic ids must be non-negative integers")
    if len(np.unique(ids, axis=0)) != len(ids):
        raise ValueError("semantic ids must be unique per item (add a collision level)")
    return ids.astype(np.int64, copy=False)


def build_trie(semantic_ids: np.ndarray) -> TrieArrays:
    """Vectorised build: one lexicographic sort, then per depth a few array passes."""
    ids = validate_semantic_ids(semantic_ids)
    n_items, levels = ids.shape
    order = np.lexsort(ids.T[::-1])  # lexicographic by level 0, then 1, ...
    sorted_ids = ids[order]

    # node_of[d][i]: id of the depth-d node on the path of the i-th item in code order
    differs = np.ones((n_items, levels), dtype=bool)
    differs[1:] = sorted_ids[1:] != sorted_ids[:-1]
    prefix_changes = np.logical_or.accumulate(differs, axis=1)  # (N, L): prefix of length d+1 differs
    node_of = [np.zeros(n_items, dtype=np.int64)]
    for d in range(levels):
        node_of.append(np.cumsum(prefix_changes[:, d]) - 1)

    codes: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    for d in range(levels):
        first = np.flatnonzero(prefix_changes[:, d])  # first item of each depth-(d+1) node
        child_parent = node_of[d][first]
        child_code = sorted_ids[first, d]
        n_parents = int(node_of[d][-1]) + 1
        fanout = np.bincount(child_parent, minlength=n_parents)
        offset = np.zeros(n_parents, dtype=np.int64)
        offset[1:] = np.cumsum(fanout)[:-1]
        width = int(fanout.max())
        table = np.full((n_parents, width), -1, dtype=np.int32)
        slot = np.arange(len(first)) - offset[child_parent]
        table[child_parent, slot] = child_code
        codes.append(table)
        offsets.append(offset.astype(np.int32))
    return TrieArrays(codes=codes, offsets=offsets, leaf_items=order.astype(np.int32))


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
