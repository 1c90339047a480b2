"""Datasets: the genrec folder format, adapters for the bundled sources, leave-one-out splits.

genrec format (a folder):
    items.jsonl[.gz]  one JSON object per line: {"item_id": str|int, "title": str, "text": str,
                      "attributes": {name: str | [str]}} (`text` optional, falls back to `title`;
                      `attributes` optional: what per-request filters in the service match on)
    sequences.txt     one line per user: `user_id item_id item_id ...`, oldest first

The bundled sources (data/beauty, data/scientific) have their own shapes; `load_dataset("beauty")`
and `load_dataset("scientific")` adapt them into the same `Dataset`.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

# Resolved from this file, so the bundled data is found wherever the repo is checked out.
DATA_ROOT = Path(__file__).resolve().parent.parent / "data"
BUNDLED = ("beauty", "scientific")
MIN_SEQUENCE_LENGTH = 3  # leave-one-out needs >= 1 train item, 1 valid and 1 test target


class DatasetFormatError(ValueError):
    """A dataset file is malformed; names the file, the 1-based line (0 = whole file) and why."""

    def __init__(self, file: str | Path, line: int, reason: str) -> None:
        self.file = str(file)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.file}:{line}: {reason}" if line else f"{self.file}: {reason}")


@dataclass(frozen=True)
class Dataset:
    name: str
    item_ids: list[str]  # external id of internal item index i
    titles: list[str]
    texts: list[str]
    user_ids: list[str]
    sequences: list[np.ndarray]  # int64 internal item indices, chronological
    # Per item {attribute name: values}, e.g. {"brand": ["OPI"], "category": ["Makeup", "Nails"]}; the
    # service's per-request filters match on them. None when the source has none.
    attributes: list[dict[str, list[str]]] | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def interactions_fingerprint(self) -> str:
        """sha256 over the item ids and every user's sequence: what a model trained on the
        interactions depends on (a cached table is reused only for the same fingerprint)."""
        h = hashlib.sha256("\n".join(self.item_ids).encode())
        for sequence in self.sequences:
            h.update(len(sequence).to_bytes(8, "little"))
            h.update(np.asarray(sequence, dtype=np.int64).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    """Leave-one-out splits; index u of every list/array is user u of the dataset."""

    train_sequences: list[np.ndarray]  # items[:n-2]; every prefix of it is a training example
    valid_histories: list[np.ndarray]  # items[:n-2][-max_history:]
    valid_targets: np.ndarray  # (U,) int64, items[n-2]
    test_histories: list[np.ndarray]  # items[:n-1][-max_history:]
    test_targets: np.ndarray  # (U,) int64, items[n-1]
    max_history: int


# ---------------------------------------------------------------------------------------------
# Reading helpers


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, stripped line), skipping blank lines."""
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if line:
                    yield lineno, line
    except (OSError, UnicodeDecodeError, EOFError) as e:  # bad gzip / encoding
        raise DatasetFormatError(path, 0, f"cannot read file: {e}") from e


def _iter_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    n = 0
    for lineno, line in _iter_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(path, lineno, f"invalid JSON: {e.msg}") from e
        if not isinstance(obj, dict):
            raise DatasetFormatError(path, lineno, "expected a JSON object")
        n += 1
        yield lineno, obj
    if n == 0:
        raise DatasetFormatError(path, 0, "empty file: no items")


def _find_items_file(folder: Path) -> Path:
    for name in ("items.jsonl", "items.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetFormatError(folder / "items.jsonl", 0, "missing items.jsonl or items.jsonl.gz")


def _str_field(path: Path, lineno: int, obj: dict[str, Any], key: str, required: bool) -> str | None:
    if key not in obj:
        if required:
            raise DatasetFormatError(path, lineno, f"missing field '{key}'")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetFormatError(path, lineno, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _item_id_field(path: Path, lineno: int, obj: dict[str, Any], integer_only: bool) -> str:
    if "item_id" not in obj:
        raise DatasetFormatError(path, lineno, "missing field 'item_id'")
    v = obj["item_id"]
    # bool is an int subclass in Python; true/false is never a valid id.
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (integer_only and not isinstance(v, int)):
        want = "an integer" if integer_only else "a string or an integer"
        raise DatasetFormatError(path, lineno, f"item_id must be {want}, got {json.dumps(v)}")
    s = str(v).strip()
    if not s or any(c.isspace() for c in s):
        raise DatasetFormatError(path, lineno, f"item_id must be non-empty without whitespace, got {json.dumps(v)}")
    return s


def _read_sequences(path: Path, index_of: dict[str, int], integer_ids: bool) -> tuple[list[str], list[np.ndarray]]:
    """Parses `user item item ...` lines into internal indices; validates every token."""
    if not path.is_file():
        raise DatasetFormatError(path, 0, "missing sequences file")
    user_ids: list[str] = []
    sequences: list[np.ndarray] = []
    seen_users: set[str] = set()
    for lineno, line in _iter_lines(path):
        tokens = line.split()
        user, items = tokens[0], tokens[1:]
        if user in seen_users:
            raise DatasetFormatError(path, lineno, f"duplicate user id '{user}'")
        if len(items) < MIN_SEQUENCE_LENGTH:
            raise DatasetFormatError(
                path, lineno, f"user '{user}' has {len(items)} items; leave-one-out needs at least {MIN_SEQUENCE_LENGTH}"
            )
        seq = np.empty(len(items), dtype=np.int64)
        for j, tok in enumerate(items):
            if integer_ids:
                try:
                    tok = str(int(tok))
                except ValueError:
                    raise DatasetFormatError(path, lineno, f"item id '{tok}' is not an integer") from None
            idx = index_of.get(tok)
            if idx is None:
                raise DatasetFormatError(path, lineno, f"unknown item id '{tok}' (not in the items file)")
            seq[j] = idx
        seen_users.add(user)
        user_ids.append(user)
        sequences.append(seq)
    if not sequences:
        raise DatasetFormatError(path, 0, "empty file: no user sequences")
    return user_ids, sequences


def _index_items(path: Path, rows: list[tuple[int, str]]) -> dict[str, int]:
    index_of: dict[str, int] = {}
    for i, (lineno, item_id) in enumerate(rows):
        if item_id in index_of:
            raise DatasetFormatError(path, lineno, f"duplicate item_id '{item_id}'")
        index_of[item_id] = i
    return index_of


# ---------------------------------------------------------------------------------------------
# Formats


def read_genrec_folder(folder: str | Path, name: str | None = None) -> Dataset:
    """Reads a folder in the genrec format. Internal item index = line order of the items file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(folder, 0, "dataset folder does not exist")
    items_path = _find_items_file(folder)
    rows: list[tuple[int, str]] = []
    titles: list[str] = []
    texts: list[str] = []
    attributes: list[dict[str, list[str]]] = []
    for lineno, obj in _iter_json(items_path):
        item_id = _item_id_field(items_path, lineno, obj, integer_only=False)
        attributes.append(_attributes_field(items_path, lineno, obj))
        title = _str_field(items_path, lineno, obj, "title", required=True)
        text = _str_field(items_path, lineno, obj, "text", required=False)
        assert title is not None
        text = text if text and text.strip() else title  # contract: text falls back to title
        if not text.strip():
            raise DatasetFormatError(items_path, lineno, "item has neither title nor text")
        rows.append((lineno, item_id))
        titles.append(title)
        texts.append(text)
    index_of = _index_items(items_path, rows)
    user_ids, sequences = _read_sequences(folder / "sequences.txt", index_of, integer_ids=False)
    return Dataset(name or folder.name, [r[1] for r in rows], titles, texts, user_ids, sequences,
                   attributes if any(attributes) else None)


def _attributes_field(path: Path, lineno: int, obj: dict[str, Any]) -> dict[str, list[str]]:
    """The optional `attributes` object: {name: a string or a list of strings} -> {name: [values]}."""
    raw = obj.get("attributes")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DatasetFormatError(path, lineno, "field 'attributes' must be an object {name: value or [values]}")
    out: dict[str, list[str]] = {}
    for name, value in raw.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DatasetFormatError(path, lineno, f"attribute {name!r} must be a string or a list of strings")
        kept = [v.strip() for v in values if v.strip()]
        if kept:
            out[str(name)] = kept
    return out


def _read_numbered_items(items_path: Path, describe, attributes_of) -> tuple[list[str], list[str], list[str],
                                                                          list[dict[str, list[str]]], dict[str, int]]:
    """Items with integer ids; describe(items_path, lineno, obj) -> (title, text), attributes_of(obj,
    text) -> {name: [values]}. Returns item ids, titles, texts, attributes and the id -> index map."""
    rows: list[tuple[int, str]] = []
    titles: list[str] = []
    texts: list[str] = []
    attributes: list[dict[str, list[str]]] = []
    for lineno, obj in _iter_json(items_path):
        item_id = _item_id_field(items_path, lineno, obj, integer_only=True)
        title, text = describe(items_path, lineno, obj)
        titles.append(title)
        texts.append(text)
        attributes.append(attributes_of(obj, text))
        rows.append((lineno, item_id))
    return [r[1] for r in rows], titles, texts, attributes, _index_items(items_path, rows)


# Beauty's `attributes` list is [brand, top category, ..., leaf category] when the brand has >= 5 items,
# else the category path alone; it starts with one of these six top categories exactly when no brand leads.
BEAUTY_TOP_CATEGORIES = frozenset({"Skin Care", "Hair Care", "Makeup", "Tools & Accessories", "Bath & Body", "Fragrance"})


def _beauty_attributes(obj: dict, text: str) -> dict[str, list[str]]:
    """{"brand": [brand], "category": [top, ..., leaf]}; brand "Unknown" is no brand."""
    path = [a.strip() for a in obj.get("attributes", []) if a.strip()]
    out: dict[str, list[str]] = {}
    if path and path[0] not in BEAUTY_TOP_CATEGORIES:
        if path[0] != "Unknown":
            out["brand"] = [path[0]]
        path = path[1:]
    if path:
        out["category"] = path
    return out


def _scientific_attributes(obj: dict, text: str) -> dict[str, list[str]]:
    """{"brand": [brand]}: the text is "Title. Categories. Brand."; the category path is its words run
    together (no separators), so it is not offered as a filter."""
    parts = text.rstrip(".").rsplit(". ", 2)
    brand = parts[-1].strip() if len(parts) == 3 else ""
    return {"brand": [brand]} if brand else {}


def _describe_beauty_item(items_path: Path, lineno: int, obj: dict) -> tuple[str, str]:
    title = (_str_field(items_path, lineno, obj, "title", required=True) or "").strip()
    attrs = obj.get("attributes", [])
    if not isinstance(attrs, list) or not all(isinstance(a, str) for a in attrs):
        raise DatasetFormatError(items_path, lineno, "field 'attributes' must be a list of strings")
    attr_text = ", ".join(a.strip() for a in attrs if a.strip())
    if not title and not attr_text:
        raise DatasetFormatError(items_path, lineno, "item has neither title nor attributes")
    # 7 items have no title: show and embed their attributes instead.
    return title or attr_text, f"{title}. {attr_text}" if title and attr_text else (title or attr_text)


def _describe_scientific_item(items_path: Path, lineno: int, obj: dict) -> tuple[str, str]:
    text = (_str_field(items_path, lineno, obj, "text", required=True) or "").strip()
    if not text:
        raise DatasetFormatError(items_path, lineno, "empty 'text'")
    return text.split(". ", 1)[0], text  # the title is the text's first sentence


def read_beauty(folder: str | Path = DATA_ROOT / "beauty") -> Dataset:
    """Amazon Beauty 2014 5-core: items {item_id 1.., title, attributes}, sequential_data.txt."""
    folder = Path(folder)
    item_ids, titles, texts, attributes, index_of = _read_numbered_items(
        folder / "items.jsonl.gz", _describe_beauty_item, _beauty_attributes)
    user_ids, sequences = _read_sequences(folder / "sequential_data.txt", index_of, integer_ids=True)
    return Dataset("beauty", item_ids, titles, texts, user_ids, sequences, attributes)


def read_scientific(folder: str | Path = DATA_ROOT / "scientific") -> Dataset:
    """UniSRec Scientific: items {item_id 0.., asin, text="Title. Categories. Brand."}, sequences.txt."""
    folder = Path(folder)
    item_ids, titles, texts, attributes, index_of = _read_numbered_items(
        folder / "items.jsonl.gz", _describe_scientific_item, _scientific_attributes)
    user_ids, sequences = _read_sequences(folder / "sequences.txt", index_of, integer_ids=True)
    return Dataset("scientific", item_ids, titles, texts, user_ids, sequences, attributes)


def load_dataset(name_or_path: str | Path) -> Dataset:
    """"beauty" / "scientific" -> the bundled data; anything else -> a folder in the genrec format."""
    if str(name_or_path) == "beauty":
        return read_beauty(DATA_ROOT / "beauty")
    if str(name_or_path) == "scientific":
        return read_scientific(DATA_ROOT / "scientific")
    return read_genrec_folder(Path(name_or_path))


def write_dataset(dataset: Dataset, folder: str | Path, compress: bool = False) -> Path:
    """Writes `dataset` in the genrec format (readable back with `load_dataset(folder)`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items_path = folder / ("items.jsonl.gz" if compress else "items.jsonl")
    opener = gzip.open if compress else open
    with opener(items_path, "wt", encoding="utf-8") as f:  # type: ignore[operator]
        attributes = dataset.attributes or [{}] * dataset.n_items
        for item_id, title, text, attrs in zip(dataset.item_ids, dataset.titles, dataset.texts, attributes):
            row = {"item_id": item_id, "title": title, "text": text} | ({"attributes": attrs} if attrs else {})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(folder / "sequences.txt", "w", encoding="utf-8") as f:
        for user, seq in zip(dataset.user_ids, dataset.sequences):
            f.write(" ".join([user, *(dataset.item_ids[i] for i in seq)]) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# Splits and statistics


def leave_one_out(dataset: Dataset, max_history: int = 20) -> Splits:
    """Per user with n items: test = item n-1 (history items[:n-1][-H:]), valid = item n-2
    (history items[:n-2][-H:]), train = items[:n-2]."""
    if max_history < 1:
        raise ValueError("max_history must be >= 1")
    train, vh, th = [], [], []
    vt = np.empty(dataset.n_users, dtype=np.int64)
    tt = np.empty(dataset.n_users, dtype=np.int64)
    for u, seq in enumerate(dataset.sequences):
        seq = np.asarray(seq, dtype=np.int64)
        n = len(seq)
        if n < MIN_SEQUENCE_LENGTH:
            raise ValueError(f"user {dataset.user_ids[u]} has {n} items; need >= {MIN_SEQUENCE_LENGTH}")
        train.append(seq[: n - 2].copy())
        vh.append(seq[: n - 2][-max_history:].copy())
        vt[u] = seq[n - 2]
        th.append(seq[: n - 1][-max_history:].copy())
        tt[u] = seq[n - 1]
    return Splits(train, vh, vt, th, tt, max_history)


def item_popularity(train_sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """(n_items,) int64 interaction counts over the training sequences only (no valid/test leak)."""
    if not train_sequences:
        return np.zeros(n_items, dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train_sequences])
    return np.bincount(flat, minlength=n_items).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Synthetic data for tests

_TOPICS = [
    "lipstick", "shampoo", "sunscreen", "perfume", "mascara", "nail polish", "face cream", "hair dryer",
    "microscope", "pipette", "soldering iron", "3d filament", "multimeter", "beaker", "caliper", "lab gloves",
]
_ADJECTIVES = ["red", "matte", "organic", "travel size", "deluxe", "classic", "mini", "pro", "gentle", "bright"]


def make_synthetic_dataset(n_users: int, n_items: int, seed: int = 0, n_clusters: int | None = None,
                           max_length: int = 10) -> Dataset:
    """Items in topic clusters; users walk through one cluster in item order, so the next item is
    mostly predictable (the successor in the cluster) and a model has something to learn.
    History lengths are uniform in [3, min(max_length, cluster size)]: few clusters for long ones."""
    if n_items < MIN_SEQUENCE_LENGTH:
        raise ValueError("need at least 3 items")
    rng = np.random.default_rng(seed)
    k = n_clusters or max(2, min(len(_TOPICS), n_items // 8))
    cluster_of = np.arange(n_items) % k
    members = [np.flatnonzero(cluster_of == c) for c in range(k)]
    titles, texts, attributes = [], [], []
    for i in range(n_items):
        topic = _TOPICS[cluster_of[i] % len(_TOPICS)]
        adj = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
        titles.append(f"{adj} {topic} #{i}")
        texts.append(f"{adj} {topic} #{i}. {topic} {cluster_of[i]}. brand{cluster_of[i]}")
        attributes.append({"brand": [f"brand{cluster_of[i]}"], "category": [topic], "style": [adj]})
    sequences = []
    for _ in range(n_users):
        c = int(rng.integers(k))
        m = members[c] if len(members[c]) >= MIN_SEQUENCE_LENGTH else np.arange(n_items)
        length = int(rng.integers(MIN_SEQUENCE_LENGTH, max(MIN_SEQUENCE_LENGTH, min(max_length, len(m))) + 1))
        pos = int(rng.integers(len(m)))
        seq = []
        for _ in range(length):
            seq.append(int(m[pos % len(m)]))
            # mostly step to the cluster successor; sometimes jump within the cluster
            pos = pos + 1 if rng.random() < 0.8 else int(rng.integers(len(m)))
        sequences.append(np.asarray(seq, dtype=np.int64))
    return Dataset(
        name=f"synthetic-{n_users}x{n_items}-s{seed}",
        item_ids=[f"i{i}" for i in range(n_items)],
        titles=titles,
        texts=texts,
        user_ids=[f"u{u}" for u in range(n_users)],
        sequences=sequences,
        attributes=attributes,
    )
