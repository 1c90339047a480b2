"""Item tokenizers: embeddings -> discrete codes; see base.py for the shared interface."""
from __future__ import annotations

from typing import Any

from training.tokenizers.base import (
    VIEWS, CatalogCodes, FitReport, ItemTokenizer, ItemViews, SemanticIdReport, TrainableTokenizer, assign_semantic_ids,
    code_usage,
)
from training.tokenizers.letter import LetterConfig, LetterTokenizer
from training.tokenizers.rqkmeans import RQKMeansConfig, RQKMeansTokenizer
from training.tokenizers.precomputed import PrecomputedCodesTokenizer
from training.tokenizers.rqvae import RQVAEConfig, RQVAETokenizer

_REGISTRY: dict[str, type] = {
    "rqvae": RQVAETokenizer,
    "rqkmeans": RQKMeansTokenizer,
    "precomputed": PrecomputedCodesTokenizer,
    "letter": LetterTokenizer,
}


def get_tokenizer(kind: str, input_view: str = "text", **params: Any) -> ItemTokenizer:
    """Builds a tokenizer by kind; `params` are its config fields (as in the manifest's params),
    input_view the item view it reads (VIEWS)."""
    if kind not in _REGISTRY:
        raise KeyError(f"unknown tokenizer kind {kind!r}; known: {sorted(_REGISTRY)}")
    if input_view not in VIEWS:
        raise ValueError(f"unknown input view {input_view!r}; known: {list(VIEWS)}")
    return _REGISTRY[kind](input_view=input_view, **params)  # type: ignore[no-any-return]


def load_bundle_tokenizer(bundle_dir) -> ItemTokenizer:
    """The tokenizer a bundle was exported with (manifest tokenizer kind, params and input view, and
    tokenizer.safetensors): encode() gives a new item its raw codes from its views, e.g. the text
    embedding of its text with the bundle's text encoder. Collaborative views need a vector the new
    item does not have yet."""
    from safetensors.numpy import load_file

    from service.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    info = bundle.manifest.tokenizer
    tokenizer = get_tokenizer(info["kind"], input_view=info.get("item_features", "text"), **info.get("params", {}))
    tokenizer.load_state_dict(load_file(str(bundle.file("tokenizer.safetensors"))))
    return tokenizer


__all__ = [
    "VIEWS", "CatalogCodes", "FitReport", "ItemTokenizer", "ItemViews", "SemanticIdReport", "TrainableTokenizer",
    "assign_semantic_ids", "code_usage", "get_tokenizer", "load_bundle_tokenizer",
    "LetterConfig", "LetterTokenizer", "RQKMeansConfig", "RQKMeansTokenizer", "RQVAEConfig", "RQVAETokenizer",
]
