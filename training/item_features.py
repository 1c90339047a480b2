"""What the tokenizer clusters: text embeddings, collaborative item embeddings, or both.

Text embeddings put items with similar descriptions on the same code prefix; collaborative
embeddings (SASRec's item table, trained on the same training split) put items bought by the same
people there. The recommender predicts the first code hardest, so codes that follow co-purchase
structure make its first decision an easier one. "text+collaborative" concatenates the two after
L2-normalising each, the collaborative half scaled by `collaborative_weight`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.data import Dataset

ITEM_FEATURES = ("text", "collaborative", "text+collaborative")
SASREC_DROPOUT = {"beauty": 0.3, "scientific": 0.5}  # the recipes of the README's SASRec rows
SASREC_MAX_TRAIN_SECONDS = 1500.0


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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


def item_features(
    kind: str,
    text_embeddings: Callable[[], np.ndarray],
    dataset: Dataset,
    seed: int,
    collaborative_weight: float = 1.0,
    progress: bool = True,
) -> np.ndarray:
    """(N, D) float32 features the tokenizer fits, in dataset item order. text_embeddings is called
    only when the kind needs them (encoding a catalog's texts takes minutes on a CPU)."""
    if kind not in ITEM_FEATURES:
        raise ValueError(f"unknown item_features {kind!r}; known: {list(ITEM_FEATURES)}")
    if kind == "text":
        return np.asarray(text_embeddings(), dtype=np.float32)
    collaborative = _unit_rows(collaborative_embeddings(dataset, seed, progress))
    if kind == "collaborative":
        return collaborative
    return np.concatenate([_unit_rows(text_embeddings()), collaborative_weight * collaborative], axis=1)
