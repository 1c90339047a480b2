"""The item views a tokenizer reads: text embeddings, collaborative item embeddings, or both.

Text embeddings put items with similar descriptions on the same code prefix; collaborative
embeddings (SASRec's item table, trained on the same training split) put items bought by the same
people there. The recommender predicts the first code hardest, so codes that follow co-purchase
structure make its first decision an easier one. How views combine: tokenizers.ItemViews.matrix.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.data import Dataset
from training.tokenizers.base import VIEWS, ItemViews

SASREC_DROPOUT = {"beauty": 0.3, "scientific": 0.5}  # the SASRec rows' recipes (docs/results.md)
SASREC_MAX_TRAIN_SECONDS = 1500.0


def collaborative_embeddings(dataset: Dataset, seed: int, progress: bool = True) -> np.ndarray:
    """SASRec's item embeddings for this dataset and seed: the cached artifact when it matches the
    catalog, else SASRec is trained now (same leave-one-out training split) and cached."""
    from training.sasrec import SASRecConfig, SASRecTrainConfig, default_artifact_path, load_item_embeddings, run

    path = default_artifact_path(dataset.name, seed)
    if path.is_file():
        embeddings, meta = load_item_embeddings(path)
        if embeddings.shape[0] == dataset.n_items and meta.get("dataset", dataset.name) == dataset.name:
            if progress:
                print(f"[genrec] collaborative embeddings: {path}", flush=True)
            return embeddings
    if progress:
        print(f"[genrec] training SASRec for collaborative embeddings -> {path}", flush=True)
    model_cfg = SASRecConfig(dropout=SASREC_DROPOUT.get(dataset.name, 0.3))
    train_cfg = SASRecTrainConfig(seed=seed, max_train_seconds=SASREC_MAX_TRAIN_SECONDS)
    run(dataset, model_cfg, train_cfg, out=path, progress=progress)
    return load_item_embeddings(path)[0]


def item_views(
    names: set[str],
    text_embeddings: Callable[[], np.ndarray],
    dataset: Dataset,
    seed: int,
    collaborative_weight: float = 1.0,
    progress: bool = True,
) -> ItemViews:
    """The item views named ("text", "collaborative"), in dataset item order; the others stay None.
    text_embeddings is called only when needed (encoding a catalog's texts takes minutes on a CPU);
    collaborative embeddings are SASRec's, trained now when no cached artifact matches."""
    unknown = sorted(set(names) - {"text", "collaborative"})
    if unknown:
        raise ValueError(f"unknown item views {unknown}; known: {list(VIEWS)}")
    return ItemViews(
        text=np.asarray(text_embeddings(), dtype=np.float32) if "text" in names else None,
        collaborative=collaborative_embeddings(dataset, seed, progress) if "collaborative" in names else None,
        collaborative_weight=collaborative_weight,
    )


def sasrec_reference(dataset: Dataset, seed: int) -> dict | None:
    """SASRec's valid and test figures from its cached artifact for this catalog, if there is one."""
    from training.sasrec import default_artifact_path, load_item_embeddings

    path = default_artifact_path(dataset.name, seed)
    if not path.is_file():
        return None
    embeddings, meta = load_item_embeddings(path)
    if embeddings.shape[0] != dataset.n_items or "valid" not in meta or "test" not in meta:
        return None
    return {"valid": meta["valid"], "test": meta["test"]}
