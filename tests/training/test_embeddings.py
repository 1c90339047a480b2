from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from training.cache import cache_key, cache_path
from training.embeddings import (
    HashingEncoder,
    MiniLMEncoder,
    TextEncoder,
    embed_items,
    embeddings_cache_path,
    get_text_encoder,
)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class CountingEncoder:
    """Wraps an encoder and counts how many texts it was asked to encode."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        return self.inner.encode(texts)


def test_cache_path_env_and_key(_tmp_cache: Path) -> None:
    p = cache_path("embeddings", ["a", "b"], suffix=".npy")
    assert p.parent == _tmp_cache / "embeddings" and p.parent.is_dir() and p.name.endswith(".npy")
    assert len(p.stem) == 64
    assert cache_key(["ab", "c"]) != cache_key(["a", "bc"])  # parts are length-prefixed
    assert cache_path("embeddings", ["a", "b"]) == cache_path("embeddings", ["a", "b"])
    with pytest.raises(ValueError):
        cache_path("../escape", ["x"])


def test_hashing_encoder_is_deterministic_and_normalised() -> None:
    enc = get_text_encoder("hashing-32")
    assert isinstance(enc, HashingEncoder) and enc.dim == 32 and isinstance(enc, TextEncoder)
    a = enc.encode(["red matte lipstick", "red matte lipstick set", "soldering iron station"])
    b = HashingEncoder(32).encode(["red matte lipstick", "red matte lipstick set", "soldering iron station"])
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert a[0] @ a[1] > a[0] @ a[2]
    with pytest.raises(KeyError):
        get_text_encoder("no-such-encoder")


def test_embed_items_cache_hit() -> None:
    texts = ["one item", "another item", "third"]
    enc = CountingEncoder(HashingEncoder(16))
    first = embed_items(texts, enc)
    assert enc.calls == 1 and embeddings_cache_path(texts, enc).is_file()
    second = embed_items(texts, enc)
    assert enc.calls == 1  # served from disk
    np.testing.assert_array_equal(first, second)
    embed_items(texts[:2], enc)  # different texts -> different key -> encodes
    assert enc.calls == 2
    other = CountingEncoder(HashingEncoder(8))  # different encoder name -> different key
    assert embed_items(texts, other).shape == (3, 8) and other.calls == 1


def test_minilm_offline() -> None:
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by importing training.embeddings
    enc = MiniLMEncoder(show_progress=False)
    x = embed_items(["red matte lipstick", "matte red lip stick"], enc, use_cache=False)
    assert x.shape == (2, 384) and x.dtype == np.float32
    y = enc.encode(["red matte lipstick", "3D printer PLA filament, 1.75 mm"])
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-4)
    assert float(x[0] @ x[1]) > float(y[0] @ y[1]) + 0.3  # similar texts much closer than unrelated
