"""Load and verify a model bundle (`models/<name>/<version>/`); numpy and the standard library only.

The bundle is the whole contract between training and serving (docs/architecture.md). A bundle is
refused, with the reason, when its schema version is unknown, a listed file is missing or its sha256
differs, or the arrays disagree with each other.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from service.fusion import OFFSETS_FILE, TransitionFusion, load_fusion

# Bump when the bundle's layout or graph contract changes; the service reads this version only.
SCHEMA_VERSION = 1
# Files every bundle must list (and so checksum); the graphs are checked by the engine that uses them.
REQUIRED_FILES = ("semantic_ids.npy", "items.jsonl", "popularity.npy")
_HASH_CHUNK = 1 << 20


class BundleError(Exception):
    """The bundle cannot be served; the message says which file and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(bundle_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """{name: sha256} for the manifest's "files" (used by the exporter too)."""
    return {name: sha256_file(Path(bundle_dir) / name) for name in sorted(names)}


@dataclass(frozen=True)
class Manifest:
    """manifest.json: what the exporter writes and the service reads."""
    name: str
    version: str
    max_history: int
    beam_size: int
    files: dict[str, str]  # file name -> sha256 of every other file of the bundle
    model: dict[str, Any]  # {"kind": a training.model_kinds name, "config": the kind's config fields}
    tokenizer: dict[str, Any] = field(default_factory=dict)  # kind, params, levels, codebook sizes, code statistics
    dataset: str = ""
    created_at: str = ""
    text_encoder: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # {"kind": "transitions", "weight": w}: the served ranking fuses the beam with the successor lists
    # (service/fusion.py); empty: the beam alone.
    fusion: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, bundle_dir: Path) -> None:
        (Path(bundle_dir) / "manifest.json").write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str = "manifest.json") -> Manifest:
        """Validates and builds; BundleError names the key and what to fix."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{source}: schema_version {version!r} is not supported (this service reads "
                              f"{SCHEMA_VERSION}; re-export the bundle with this version's training code)")
        missing = [k for k in ("name", "version", "max_history", "beam_size", "files", "model") if k not in data]
        if missing:
            raise BundleError(f"{source}: missing keys {missing}")
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise BundleError(f"{source}: 'files' must map file name -> sha256 hex string")
        unlisted = [name for name in REQUIRED_FILES if name not in files]
        if unlisted:
            raise BundleError(f"{source}: 'files' does not list required {unlisted}")
        for key in ("max_history", "beam_size"):
            if not isinstance(data[key], int) or data[key] < 1:
                raise BundleError(f"{source}: {key} must be a positive integer, got {data[key]!r}")
        if not isinstance(data["model"], dict) or "kind" not in data["model"]:
            raise BundleError(f"{source}: 'model' must be an object with the model 'kind' and its 'config'")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise BundleError(f"{source}: unknown keys {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    semantic_ids: np.ndarray  # (N, L) int32
    item_ids: list[str]  # external id of item index i
    titles: list[str]
    popularity: np.ndarray  # (P,) int64 item indices, most popular first
    index_of: dict[str, int] = field(repr=False)  # external id -> item index
    # Per item {attribute name: values} from items.jsonl's optional "attributes" (empty dict: none);
    # what per-request filters match on (service/constraints.py). Bundles exported without them: all empty.
    attributes: list[dict[str, list[str]]] = field(default_factory=list, repr=False)
    fusion: TransitionFusion | None = field(default=None, repr=False)  # manifest.fusion's table, if any

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def dataset(self) -> str:
        return self.manifest.dataset

    @property
    def beam_size(self) -> int:
        return self.manifest.beam_size

    @property
    def max_history(self) -> int:
        return self.manifest.max_history

    @property
    def num_items(self) -> int:
        return int(self.semantic_ids.shape[0])

    @property
    def levels(self) -> int:
        return int(self.semantic_ids.shape[1])

    def file(self, name: str) -> Path:
        """Path of a checksummed file of the bundle; refuses files the manifest does not list."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: manifest.json does not list {name!r} in 'files'")
        return self.path / name

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """(known item indices in input order, unknown external ids in input order)."""
        return lookup_ids(self.index_of, item_ids)


def lookup_ids(index_of: dict[str, int], item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
    """(indices of the ids index_of knows, in input order; the ids it does not know, in input order)."""
    known: list[int] = []
    unknown: list[str] = []
    for item_id in item_ids:
        index = index_of.get(item_id)
        if index is None:
            unknown.append(item_id)
        else:
            known.append(index)
    return known, unknown


def load_bundle(bundle_dir: Path | str, *, verify_checksums: bool = True) -> Bundle:
    path = Path(bundle_dir)
    manifest = _read_manifest(path)
    if verify_checksums:
        _verify_files(path, manifest.files)

    semantic_ids = _load_array(path / "semantic_ids.npy")
    if semantic_ids.ndim != 2 or not np.issubdtype(semantic_ids.dtype, np.integer) or semantic_ids.size == 0:
        raise BundleError(f"{path}/semantic_ids.npy: expected a non-empty (N, L) integer array, "
                          f"got {semantic_ids.dtype} {semantic_ids.shape}")
    if semantic_ids.min() < 0:
        raise BundleError(f"{path}/semantic_ids.npy: codes must be non-negative")
    if len(np.unique(semantic_ids, axis=0)) != len(semantic_ids):
        raise BundleError(f"{path}/semantic_ids.npy: rows must be unique (one code tuple per item)")
    n_items, levels = semantic_ids.shape
    declared_levels = manifest.tokenizer.get("levels")
    if declared_levels is not None and int(declared_levels) != levels:
        raise BundleError(f"{path}: manifest tokenizer.levels={declared_levels} but semantic_ids.npy "
                          f"has {levels} levels")

    item_ids, titles, attributes = _read_items(path / "items.jsonl")
    if len(item_ids) != n_items:
        raise BundleError(f"{path}: items.jsonl has {len(item_ids)} rows, semantic_ids.npy has {n_items}")
    index_of = {item_id: i for i, item_id in enumerate(item_ids)}
    if len(index_of) != n_items:
        raise BundleError(f"{path}/items.jsonl: item_id values are not unique")

    popularity = _load_array(path / "popularity.npy")
    if popularity.ndim != 1 or not np.issubdtype(popularity.dtype, np.integer):
        raise BundleError(f"{path}/popularity.npy: expected a 1-D integer array, got "
                          f"{popularity.dtype} {popularity.shape}")
    if popularity.size and (popularity.min() < 0 or popularity.max() >= n_items):
        raise BundleError(f"{path}/popularity.npy: item indices must lie in [0, {n_items})")
    if len(np.unique(popularity)) != len(popularity):
        raise BundleError(f"{path}/popularity.npy: item indices repeat")

    return Bundle(
        path=path,
        manifest=manifest,
        semantic_ids=semantic_ids.astype(np.int32, copy=False),
        item_ids=item_ids,
        titles=titles,
        popularity=popularity.astype(np.int64, copy=False),
        index_of=index_of,
        attributes=attributes,
        fusion=_load_fusion(path, manifest.fusion, n_items),
    )


def _load_fusion(path: Path, spec: dict[str, Any], n_items: int) -> TransitionFusion | None:
    if not spec:
        return None
    if spec.get("kind") != "transitions":
        raise BundleError(f"{path}/manifest.json: fusion kind {spec.get('kind')!r} is unknown (known: transitions)")
    try:
        fusion = load_fusion(path, spec.get("weight", 0.0))
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: the transition fusion's arrays cannot be used: {error}") from None
    if len(fusion.offsets) != n_items + 1:
        raise BundleError(f"{path}/{OFFSETS_FILE}: {len(fusion.offsets)} offsets for {n_items} items (expected N + 1)")
    return fusion


def _read_manifest(path: Path) -> Manifest:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no manifest.json (is this a models/<name>/<version> dir?)")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from e
    except OSError as e:
        raise BundleError(f"{manifest_path}: cannot be read by this process ({e.strerror}); make the bundle's files "
                          "readable by the serving user (chmod -R a+rX on the bundle folder)") from e
    return Manifest.from_dict(data, manifest_path)


def _verify_files(path: Path, files: dict[str, str]) -> None:
    for name, expected in files.items():
        file_path = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{path}: manifest lists {name!r}, which is outside the bundle")
        if not file_path.is_file():
            raise BundleError(f"{path}: manifest lists {name!r} but the file is missing")
        try:
            actual = sha256_file(file_path)
        except OSError as e:
            raise BundleError(f"{file_path}: cannot be read by this process ({e.strerror}); make the bundle's files "
                              "readable by the serving user (chmod -R a+rX on the bundle folder)") from e
        if actual != expected.lower():
            raise BundleError(f"{file_path}: sha256 mismatch (manifest {expected}, file {actual}); "
                              "the bundle is corrupt or was edited after export")


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read as a .npy array without pickle ({e})") from e


def _read_items(path: Path) -> tuple[list[str], list[str], list[dict[str, list[str]]]]:
    item_ids: list[str] = []
    titles: list[str] = []
    attributes: list[dict[str, list[str]]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item_ids.append(str(row["item_id"]))
                titles.append(str(row.get("title", "")))
                attributes.append(_item_attributes(row.get("attributes")))
            except (ValueError, KeyError, TypeError) as e:
                raise BundleError(f"{path}:{line_no}: expected {{\"item_id\": str, \"title\": str, \"attributes\": "
                                  f"{{name: [str]}} (optional)}} ({e})") from e
    return item_ids, titles, attributes


def _item_attributes(raw: Any) -> dict[str, list[str]]:
    """items.jsonl's optional "attributes": {name: str or [str]} -> {name: [str]}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TypeError("'attributes' must be an object {name: [values]}")
    out: dict[str, list[str]] = {}
    for name, values in raw.items():
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"attribute {name!r} must be a string or a list of strings")
        out[str(name)] = values
    return out
