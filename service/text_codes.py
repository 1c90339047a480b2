"""A new item's codes from its text, without torch: a STORE bundle's T2K graph (`t2k.onnx`) run with
onnxruntime on the WordPiece ids of the bundle's own tokenizer (`text_tokenizer.json`, read by the
`tokenizers` library), so the service tokenizes exactly as training did.

`TextCodes.raw_codes(texts)` gives the meaningful levels (greedy, free: a new item may get a tuple
no item has yet); `semantic_ids(texts)` appends the collision level: the next free code on the
tuple after the catalog's items (and the earlier texts of the same call).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from service.bundle import Bundle, BundleError

GRAPH = "t2k.onnx"
TOKENIZER = "text_tokenizer.json"


class TextCodes:
    def __init__(self, bundle: Bundle, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        if GRAPH not in bundle.manifest.files or TOKENIZER not in bundle.manifest.files:
            raise BundleError(f"{bundle.path}: no {GRAPH} and {TOKENIZER}: only STORE bundles give items codes from text")
        self.session = ort.InferenceSession(str(bundle.file(GRAPH)), providers=list(providers))
        self.tokenizer = Tokenizer.from_file(str(bundle.file(TOKENIZER)))
        self.catalog = bundle.semantic_ids.astype(np.int64)
        self.capacity = int(bundle.manifest.model["config"]["codebook_sizes"][-1])  # the collision level's size

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> text_tokens (B, T) int64 right-padded with 0, text_mask (B, T) bool."""
        encoded = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        width = max(1, max(len(ids) for ids in encoded))
        tokens = np.zeros((len(encoded), width), dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=bool)
        for row, ids in enumerate(encoded):
            tokens[row, : len(ids)] = ids
            mask[row, : len(ids)] = True
        return tokens, mask

    def raw_codes(self, texts: Sequence[str]) -> np.ndarray:
        """(B, L-1) int64: T2K's greedy codes of each text."""
        if not texts:
            return np.zeros((0, self.catalog.shape[1] - 1), dtype=np.int64)
        tokens, mask = self.tokenize(texts)
        return self.session.run(["codes"], {"text_tokens": tokens, "text_mask": mask})[0]

    def semantic_ids(self, texts: Sequence[str]) -> np.ndarray:
        """(B, L) int64: raw codes plus the next free collision code on each tuple; ValueError when
        a tuple's collision level is full (the model would need a larger capacity)."""
        raw = self.raw_codes(texts)
        taken = Counter(map(tuple, self.catalog[:, :-1].tolist()))
        out = np.empty((len(raw), raw.shape[1] + 1), dtype=np.int64)
        for row, codes in enumerate(map(tuple, raw.tolist())):
            if taken[codes] >= self.capacity:
                raise ValueError(f"code tuple {codes} already holds {self.capacity} items, the collision level's capacity")
            out[row] = [*codes, taken[codes]]
            taken[codes] += 1
        return out
