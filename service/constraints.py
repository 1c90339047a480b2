"""Per-request constraints: `include` / `exclude` item ids and attribute filters, applied inside the
constrained beam search.

A constraint becomes a set of allowed items (a boolean mask over the catalog). The search then runs
over the trie of the allowed items' semantic IDs alone (`restricted_trie`): a prefix is allowed iff some
allowed leaf lies under it, every step renormalizes over the allowed children only, and the beam can
fill with allowed items, so k of them come back whenever k exist. The exported graph takes the trie
as inputs, so this needs no re-export and no new graph input: a request with a constraint runs as its
own engine call (with the requests of its batch that carry the same constraint) on the restricted
trie, while unconstrained requests keep the resident full trie (docs/architecture.md says why).

Everything here is a function of what is passed in (the catalog's code table, its attribute index,
which items are active), never of module state, so a live catalog can feed it its own tables.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.trie import TrieArrays, build_trie

FilterValues = str | Sequence[str]


class UnknownAttribute(ValueError):
    """A filter names an attribute the catalog does not have (422, listing the known ones)."""

    def __init__(self, unknown: list[str], known: list[str]) -> None:
        self.unknown, self.known = unknown, known
        names = ", ".join(repr(name) for name in known) if known else "none (this bundle carries no item attributes)"
        super().__init__(f"unknown filter attribute(s) {unknown}; the catalog's attributes are: {names}")


@dataclass(frozen=True)
class AttributeIndex:
    """attribute name -> value -> item indices (sorted int64) that have that value."""

    n_items: int
    postings: Mapping[str, Mapping[str, np.ndarray]]

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Sequence[str]]], n_items: int) -> AttributeIndex:
        """rows: per item index {name: [values]} (Bundle.attributes; missing rows: no attributes)."""
        lists: dict[str, dict[str, list[int]]] = {}
        for item, row in enumerate(rows):
            for name, values in row.items():
                by_value = lists.setdefault(name, {})
                for value in set(values):
                    by_value.setdefault(value, []).append(item)
        postings = {name: {value: np.asarray(items, dtype=np.int64) for value, items in by_value.items()}
                    for name, by_value in lists.items()}
        return cls(n_items=n_items, postings=postings)

    @property
    def names(self) -> list[str]:
        return sorted(self.postings)

    def matching(self, name: str, values: Iterable[str]) -> np.ndarray:
        """(N,) bool: items having any of `values` for attribute `name`."""
        mask = np.zeros(self.n_items, dtype=bool)
        by_value = self.postings[name]
        for value in values:
            items = by_value.get(value)
            if items is not None:
                mask[items] = True
        return mask


@dataclass(frozen=True)
class Constraint:
    """A request's constraint in item indices; hashable, so equal constraints share one restricted trie."""

    include: tuple[int, ...] | None = None  # only these items (None: no include list)
    exclude: tuple[int, ...] = ()
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (attribute, accepted values), sorted

    def describe(self) -> str:
        parts = []
        if self.include is not None:
            parts.append(f"include ({len(self.include)} known id(s))")
        if self.exclude:
            parts.append(f"exclude ({len(self.exclude)} id(s))")
        parts += [f"{name} in {list(values)}" for name, values in self.filters]
        return ", ".join(parts)


def resolve_constraint(
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    filters: Mapping[str, FilterValues] | None,
    lookup: Callable[[Sequence[str]], tuple[list[int], list[str]]],
    attributes: AttributeIndex,
) -> tuple[Constraint | None, list[str]]:
    """The request's fields -> (Constraint, or None when it constrains nothing; warnings).

    Unknown attribute names raise UnknownAttribute. Unknown include / exclude ids are dropped with a
    warning, as unknown history ids are: a page built from a stale catalog (an item taken down) still
    gets an answer; an include list of unknown ids only matches nothing, and the answer says so."""
    warnings: list[str] = []
    if filters:
        unknown = sorted(set(filters) - set(attributes.postings))
        if unknown:
            raise UnknownAttribute(unknown, attributes.names)
    include_items: tuple[int, ...] | None = None
    if include is not None:
        known, missing = lookup(include)
        if missing:
            warnings.append(f"include: ignored {len(missing)} unknown item id(s): {missing[:10]}")
        include_items = tuple(sorted(set(known)))
    exclude_items: tuple[int, ...] = ()
    if exclude:
        known, missing = lookup(exclude)
        if missing:
            warnings.append(f"exclude: ignored {len(missing)} unknown item id(s): {missing[:10]}")
        exclude_items = tuple(sorted(set(known)))
    normalized = tuple(sorted((name, tuple(sorted({value} if isinstance(value, str) else set(value))))
                              for name, value in (filters or {}).items()))
    if include_items is None and not exclude_items and not normalized:
        return None, warnings
    return Constraint(include_items, exclude_items, normalized), warnings


def allowed_items(constraint: Constraint, attributes: AttributeIndex, active: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool: items that pass every filter (any listed value of each attribute), are in the include
    list when there is one, are not excluded, and are active (active=None: every item is)."""
    n = attributes.n_items
    allowed = np.ones(n, dtype=bool) if active is None else np.asarray(active, dtype=bool).copy()
    if constraint.include is not None:
        included = np.zeros(n, dtype=bool)
        included[list(constraint.include)] = True
        allowed &= included
    if constraint.exclude:
        allowed[list(constraint.exclude)] = False
    for name, values in constraint.filters:
        allowed &= attributes.matching(name, values)
    return allowed


def restricted_trie(semantic_ids: np.ndarray, allowed: np.ndarray) -> TrieArrays:
    """The trie of the allowed items' codes, its leaves mapped back to catalog item indices: exactly
    the prefixes with an allowed leaf under them. `allowed` must select at least one item."""
    items = np.flatnonzero(allowed)
    if items.size == 0:
        raise ValueError("no allowed item: there is nothing to search")
    trie = build_trie(semantic_ids[items])
    return TrieArrays(codes=trie.codes, offsets=trie.offsets, leaf_items=items[trie.leaf_items].astype(np.int32),
                      code_bounds=trie.code_bounds)


def allowed_prefixes(semantic_ids: np.ndarray, allowed: np.ndarray) -> set[tuple[int, ...]]:
    """Every prefix (the empty one included) with an allowed item under it: the reference search's mask."""
    prefixes: set[tuple[int, ...]] = {()}
    for row in np.asarray(semantic_ids)[np.flatnonzero(allowed)].tolist():
        prefixes.update(tuple(row[:depth]) for depth in range(1, len(row) + 1))
    return prefixes


@dataclass(eq=False)
class Restriction:
    """A resolved constraint over one catalog: the allowed items, their popularity order and, built
    lazily in the engine thread that first needs them, the restricted trie in each engine's form."""

    constraint: Constraint
    allowed: np.ndarray  # (N,) bool
    popular: np.ndarray  # allowed item indices, most popular first (the catalog's popularity order)
    semantic_ids: np.ndarray = field(repr=False)  # (N, L) the catalog's codes
    _built: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)  # builds nest (feeds need the trie)

    @property
    def count(self) -> int:
        return int(self.allowed.sum())

    def built(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """build() once per key (an engine's feeds, the reference's prefix set), then from the cache."""
        with self._lock:
            if key not in self._built:
                self._built[key] = build()
            return self._built[key]

    def trie(self) -> TrieArrays:
        return self.built("trie", lambda: restricted_trie(self.semantic_ids, self.allowed))

    def prefixes(self) -> set[tuple[int, ...]]:
        return self.built("prefixes", lambda: allowed_prefixes(self.semantic_ids, self.allowed))


# Bytes a restriction may hold per allowed item, with its trie built twice over (the arrays and a
# graph's feeds: ~34 bytes an item each at 10M items, docs/architecture.md) plus its popularity order.
_BYTES_PER_ALLOWED_ITEM = 2 * 40 + 8


class RestrictionCache:
    """Recently used restrictions of one catalog (LRU, bounded in entries and in estimated bytes), so a
    page's repeated filter costs its mask and trie once. A catalog change (new codes, active items)
    needs a new cache: `clear()` it when the catalog's tables are swapped."""

    def __init__(self, semantic_ids: np.ndarray, attributes: AttributeIndex, popularity: np.ndarray,
                 active: np.ndarray | None = None, max_entries: int = 64, max_bytes: int = 256 << 20) -> None:
        self.semantic_ids = semantic_ids
        self.attributes = attributes
        self.popularity = np.asarray(popularity, dtype=np.int64)
        self.active = active
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Constraint, Restriction] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _size(entry: Restriction) -> int:
        return entry.allowed.nbytes + _BYTES_PER_ALLOWED_ITEM * int(entry.popular.size)

    def get(self, constraint: Constraint) -> Restriction:
        entry = self._entries.get(constraint)
        if entry is not None:
            self._entries.move_to_end(constraint)
            return entry
        allowed = allowed_items(constraint, self.attributes, self.active)
        entry = Restriction(constraint, allowed, self.popularity[allowed[self.popularity]], self.semantic_ids)
        self._entries[constraint] = entry
        self._bytes += self._size(entry)
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            _, evicted = self._entries.popitem(last=False)  # requests holding it keep it alive until answered
            self._bytes -= self._size(evicted)
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def search_grouped(engine: Any, histories: Sequence[np.ndarray],
                   restrictions: Sequence[Restriction | None]) -> tuple[np.ndarray, np.ndarray]:
    """One engine call per distinct restriction in the batch (requests sharing one share the call;
    unconstrained requests run together on the full trie); rows come back in request order."""
    if all(r is None for r in restrictions):
        return engine.search(histories)
    groups: dict[int, list[int]] = {}
    for row, restriction in enumerate(restrictions):
        groups.setdefault(id(restriction), []).append(row)
    item_indices = np.full((len(histories), engine.beam_size), -1, dtype=np.int64)
    scores = np.full((len(histories), engine.beam_size), -np.inf, dtype=np.float32)
    for rows in groups.values():
        restriction = restrictions[rows[0]]
        group = [histories[row] for row in rows]
        found = engine.search(group) if restriction is None else engine.search(group, restriction=restriction)
        item_indices[rows], scores[rows] = found
    return item_indices, scores
