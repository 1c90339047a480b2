"""The item views a tokenizer reads: text embeddings, collaborative item embeddings, or both.

Text embeddings put items with similar descriptions on the same code prefix; collaborative
embeddings (SASRec's item table, trained on the same training split) put items bought by the same
people there. The recommender predicts the first code hardest, so codes that follow co-purchase
structure make its first decision an easier one. How views combine: tokenizers.ItemViews.matrix.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset
from training.tokenizers.base import VIEWS, ItemViews

SASREC_DROPOUT = {"beauty": 0.3, "scientific": 0.5}  # the SASRec rows' recipes (docs/results.md)
SASREC_MAX_TRAIN_SECONDS = 1500.0


def sasrec_artifact_path(dataset: Dataset, seed: int, settings: dict[str, Any] | None = None) -> Path:
    """The cached SASRec artifact for this dataset, seed and settings (non-default settings get
    their own file, so a derived configuration never reads another's table)."""
    from training.sasrec import default_artifact_path

    path = default_artifact_path(dataset.name, seed)
    if not settings:
        return path
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return path.with_name(f"{path.stem}-{key}{path.suffix}")


def sasrec_configs(dataset: Dataset, seed: int, settings: dict[str, Any] | None = None):
    """SASRec's model and training configs: the bundled datasets' recipes, then `settings`
    (fields of SASRecConfig or SASRecTrainConfig, e.g. from training/auto_config.py)."""
    from training.sasrec import SASRecConfig, SASRecTrainConfig

    model_cfg = SASRecConfig(dropout=SASREC_DROPOUT.get(dataset.name, 0.3))
    train_cfg = SASRecTrainConfig(seed=seed, max_train_seconds=SASREC_MAX_TRAIN_SECONDS)
    for name, value in (settings or {}).items():
        target = model_cfg if hasattr(model_cfg, name) else train_cfg if hasattr(train_cfg, name) else None
        if target is None or name in ("n_items", "seed"):
            raise ValueError(f"unknown SASRec setting {name!r}")
        setattr(target, name, value)
    return model_cfg, train_cfg


def artifact_matches(meta: dict, embeddings: np.ndarray, dataset: Dataset) -> bool:
    """A cached SASRec table belongs to this dataset only if it was trained on the same interactions:
    a folder of the same name with updated sequences (or another catalog) gets a new table."""
    return embeddings.shape[0] == dataset.n_items and meta.get("interactions") == dataset.interactions_fingerprint()


def collaborative_embeddings(dataset: Dataset, seed: int, progress: bool = True,
                             settings: dict[str, Any] | None = None) -> np.ndarray:
    """SASRec's item embeddings for this dataset and seed: the cached artifact when it matches the
    catalog, else SASRec is trained now (same leave-one-out training split) and cached."""
    from training.sasrec import load_item_embeddings, run

    path = sasrec_artifact_path(dataset, seed, settings)
    if path.is_file():
        embeddings, meta = load_item_embeddings(path)
        if artifact_matches(meta, embeddings, dataset):
            if progress:
                print(f"[genrec] collaborative embeddings: {path}", flush=True)
            return embeddings
    if progress:
        print(f"[genrec] training SASRec for collaborative embeddings -> {path}", flush=True)
    model_cfg, train_cfg = sasrec_configs(dataset, seed, settings)
    run(dataset, model_cfg, train_cfg, out=path, progress=progress)
    return load_item_embeddings(path)[0]


def item_views(
    names: set[str],
    text_embeddings: Callable[[], np.ndarray],
    dataset: Dataset,
    seed: int,
    collaborative_weight: float = 1.0,
    progress: bool = True,
    sasrec_settings: dict[str, Any] | None = None,
) -> ItemViews:
    """The item views named ("text", "collaborative"), in dataset item order; the others stay None.
    text_embeddings is called only when needed (encoding a catalog's texts takes minutes on a CPU);
    collaborative embeddings are SASRec's, trained now when no cached artifact matches."""
    unknown = sorted(set(names) - {"text", "collaborative"})
    if unknown:
        raise ValueError(f"unknown item views {unknown}; known: {list(VIEWS)}")
    return ItemViews(
        text=np.asarray(text_embeddings(), dtype=np.float32) if "text" in names else None,
        collaborative=collaborative_embeddings(dataset, seed, progress, sasrec_settings) if "collaborative" in names else None,
        collaborative_weight=collaborative_weight,
    )


def sasrec_reference(dataset: Dataset, seed: int, settings: dict[str, Any] | None = None) -> dict | None:
    """SASRec's valid and test figures from its cached artifact for this catalog, if there is one."""
    from training.sasrec import load_item_embeddings

    path = sasrec_artifact_path(dataset, seed, settings)
    if not path.is_file():
        return None
    embeddings, meta = load_item_embeddings(path)
    if not artifact_matches(meta, embeddings, dataset) or "valid" not in meta or "test" not in meta:
        return None
    return {key: meta[key] for key in ("valid", "test", "test_by_popularity") if key in meta}
