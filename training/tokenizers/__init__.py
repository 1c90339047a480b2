"""Item tokenizers: embeddings -> discrete codes; see base.py for the shared interface."""
from __future__ import annotations

from typing import Any

from training.tokenizers.base import FitReport, ItemTokenizer, SemanticIdReport, assign_semantic_ids, code_usage
from training.tokenizers.rqkmeans import RQKMeansConfig, RQKMeansTokenizer
from training.tokenizers.precomputed import PrecomputedCodesTokenizer
from training.tokenizers.rqvae import RQVAEConfig, RQVAETokenizer

_REGISTRY: dict[str, type] = {
    "rqvae": RQVAETokenizer,
    "rqkmeans": RQKMeansTokenizer,
    "precomputed": PrecomputedCodesTokenizer,
}


def get_tokenizer(kind: str, **params: Any) -> ItemTokenizer:
    """Builds a tokenizer by kind; `params` are its config fields (as in the manifest's params)."""
    if kind not in _REGISTRY:
        raise KeyError(f"unknown tokenizer kind {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind](**params)  # type: ignore[no-any-return]


__all__ = [
    "FitReport", "ItemTokenizer", "SemanticIdReport", "assign_semantic_ids", "code_usage", "get_tokenizer",
    "RQKMeansConfig", "RQKMeansTokenizer", "RQVAEConfig", "RQVAETokenizer",
]
