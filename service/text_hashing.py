"""The model-free hashing text encoder (numpy and zlib only), shared by training and the service so a
bundle trained on it (the `tiny` test configurations) gives new items codes with the same vectors."""
from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"\w+")


class HashingEncoder:
    """Deterministic model-free encoder for tests: signed hashed word tokens and character
    3-grams -> `dim`, L2-normalised. Texts sharing words land close together."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _features(self, text: str) -> list[str]:
        words = _TOKEN.findall(text.lower())
        grams = [w[i : i + 3] for w in (f"#{w}#" for w in words) for i in range(max(1, len(w) - 2))]
        return [f"w:{w}" for w in words] + [f"c:{g}" for g in grams]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for feat in self._features(text):
                h = zlib.crc32(feat.encode("utf-8"))  # stable across processes, unlike hash()
                out[i, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def hashing_dim(name: str) -> int | None:
    """"hashing-64" -> 64; None for any other encoder name."""
    match = re.fullmatch(r"hashing-(\d+)", name)
    return int(match.group(1)) if match else None
