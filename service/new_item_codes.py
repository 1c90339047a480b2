"""A new item's raw codes from its text, in the service: numpy, onnxruntime and `tokenizers`, no torch.

The bundle says how (manifest `tokenizer.new_items`, written by training/text_encoder_export.py):

- `codes_from: "text"`: the text encoder the bundle was trained with (all-MiniLM-L6-v2 as
  `text_encoder.onnx`, mean pooling and L2 normalisation inside the graph, its WordPiece tokenizer as
  `text_encoder_tokenizer.json`; or the model-free hashing encoder of the test configurations), then
  the tokenizer applied in numpy from `new_item_codes.npz`: residual k-means codebooks, or for RQ-VAE
  and LETTER the encoder MLP's weights, the input standardisation and the codebooks.
- `codes_from: "t2k"`: a STORE bundle's own text-to-codes graph (service/text_codes.py).
- `codes_from: "nearest_text_neighbour"`: codes from collaborative vectors (or given by a file) have no
  text path: a new item takes the code prefix of the catalog item whose text embedding is nearest
  (`catalog_text_embeddings` in the .npz), the next nearest when that prefix's collision level is full.

`NewItemCoder.candidates(texts)` gives, per text, the raw code tuples (no collision level) to try in
order; the catalog (service/catalog.py) adds the free collision code.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from service.bundle import Bundle, BundleError
from service.text_hashing import HashingEncoder, hashing_dim

NEW_ITEMS_KEY = "new_items"  # the manifest's tokenizer section that says how new items get codes
TEXT_ENCODER_GRAPH = "text_encoder.onnx"
TEXT_ENCODER_TOKENIZER = "text_encoder_tokenizer.json"
QUANTIZER_FILE = "new_item_codes.npz"
CODES_FROM = ("text", "t2k", "nearest_text_neighbour")
NEIGHBOURS_TRIED = 16  # nearest catalog items whose prefixes a new item may take (fallback only)


class NoTextPath(Exception):
    """This bundle cannot give a new item codes from its text; the message says why and what to do."""


class TextEmbedder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (B, dim) float32, L2-normalised
        ...


class OnnxTextEncoder:
    """The exported sentence encoder: WordPiece ids from the bundle's tokenizer.json (truncated to
    max_tokens as sentence-transformers does), one onnxruntime call -> (B, dim) unit vectors."""

    def __init__(self, graph: str, tokenizer_file: str, max_tokens: int, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # beside the engine: one thread, no spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.no_padding()
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self._inputs = {i.name for i in self.session.get_inputs()}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(list(texts))
        width = max(1, max(len(e.ids) for e in encoded))
        ids = np.zeros((len(encoded), width), dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, e in enumerate(encoded):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0].astype(np.float32)


def sq_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(B, D), (K, D) -> (B, K) squared distances, the formula training's k-means uses (float32)."""
    return np.maximum((x * x).sum(1, keepdims=True) - (2.0 * x) @ centres.T + (centres * centres).sum(1)[None, :], 0.0)


class ResidualQuantizer:
    """Residual quantisation in numpy: optional input standardisation and encoder MLP (RQ-VAE,
    LETTER: Linear layers with ReLU between), then per level the nearest code of the residual."""

    def __init__(self, codebooks: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]] = (),
                 input_mean: np.ndarray | None = None, input_scale: np.ndarray | None = None) -> None:
        self.codebooks = np.asarray(codebooks, dtype=np.float32)  # (L, K, d)
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
        self.input_mean = None if input_mean is None else np.asarray(input_mean, np.float32)
        self.input_scale = None if input_scale is None else np.asarray(input_scale, np.float32)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ResidualQuantizer:
        """The .npz written at export: `codebooks`, and for an encoder `encoder.<i>.weight/bias`,
        `input_mean`, `input_scale`."""
        if "codebooks" not in arrays:
            raise BundleError(f"{QUANTIZER_FILE}: no 'codebooks' array")
        indices = sorted({int(m.group(1)) for k in arrays if (m := re.fullmatch(r"encoder\.(\d+)\.weight", k))})
        layers = [(arrays[f"encoder.{i}.weight"], arrays[f"encoder.{i}.bias"]) for i in indices]
        return cls(arrays["codebooks"], layers, arrays.get("input_mean"), arrays.get("input_scale"))

    def latents(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.input_mean is not None and self.input_scale is not None:
            x = (x - self.input_mean) / self.input_scale
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return x.astype(np.float32, copy=False)

    def codes(self, x: np.ndarray) -> np.ndarray:
        """(B, D) item vectors -> (B, L) int64 raw codes."""
        residual = self.latents(x).copy()
        out = np.empty((len(residual), len(self.codebooks)), dtype=np.int64)
        for level, book in enumerate(self.codebooks):
            out[:, level] = sq_distances(residual, book).argmin(1)
            residual -= book[out[:, level]]
        return out


@dataclass
class NewItemCoder:
    """How this bundle turns a new item's text into raw code tuples (see the module doc)."""

    codes_from: str
    levels: int  # raw levels (the semantic ID's levels minus the collision level)
    embedder: TextEmbedder | None = None
    quantizer: ResidualQuantizer | None = None
    t2k: Any = None  # service.text_codes.TextCodes for STORE bundles
    catalog_embeddings: np.ndarray | None = None  # (N, D) unit rows, nearest-neighbour fallback
    catalog_raw_codes: np.ndarray | None = None  # (N, L-1)

    def raw_codes(self, texts: Sequence[str]) -> np.ndarray:
        """(B, L-1) int64: each text's first-choice raw codes."""
        return np.asarray([c[0] for c in self.candidates(texts)], dtype=np.int64).reshape(len(texts), self.levels)

    def candidates(self, texts: Sequence[str]) -> list[list[tuple[int, ...]]]:
        """Per text, the raw code tuples to try in order (one unless codes_from is the fallback)."""
        if self.codes_from == "t2k":
            return [[tuple(row)] for row in self.t2k.raw_codes(list(texts)).tolist()]
        vectors = self.embedder.encode(list(texts))
        if self.codes_from == "text":
            return [[tuple(row)] for row in self.quantizer.codes(vectors).tolist()]
        similarity = vectors @ self.catalog_embeddings.T  # (B, N) cosine: both sides are unit rows
        out = []
        for row in similarity:
            nearest = np.argsort(-row, kind="stable")[:NEIGHBOURS_TRIED]
            tuples = list(dict.fromkeys(tuple(self.catalog_raw_codes[i].tolist()) for i in nearest))
            out.append(tuples)
        return out


def text_embedder(bundle: Bundle, spec: dict[str, Any]) -> TextEmbedder:
    name = str(spec.get("text_encoder", bundle.manifest.text_encoder))
    dim = hashing_dim(name)
    if dim is not None:
        return HashingEncoder(dim)
    return OnnxTextEncoder(str(bundle.file(TEXT_ENCODER_GRAPH)), str(bundle.file(TEXT_ENCODER_TOKENIZER)),
                           int(spec.get("max_tokens", 256)))


def load_new_item_coder(bundle: Bundle) -> NewItemCoder:
    """The bundle's text path for new items; NoTextPath says why there is none."""
    levels = bundle.levels - 1
    spec = bundle.manifest.tokenizer.get(NEW_ITEMS_KEY)
    if spec is None:
        if "t2k.onnx" in bundle.manifest.files:  # STORE bundles exported before the section existed
            spec = {"codes_from": "t2k"}
        else:
            raise NoTextPath(f"bundle {bundle.name}/{bundle.version} carries no text path for new items (manifest "
                             f"tokenizer.{NEW_ITEMS_KEY}); add one with `genrec text-path --bundle {bundle.path}`")
    codes_from = spec.get("codes_from")
    if codes_from not in CODES_FROM:
        raise BundleError(f"{bundle.path}: tokenizer.{NEW_ITEMS_KEY}.codes_from {codes_from!r} is not one of {CODES_FROM}")
    if codes_from == "t2k":
        from service.text_codes import TextCodes

        return NewItemCoder("t2k", levels, t2k=TextCodes(bundle))
    arrays = _load_npz(bundle)
    embedder = text_embedder(bundle, spec)
    if codes_from == "text":
        quantizer = ResidualQuantizer.from_arrays(arrays)
        if quantizer.codebooks.shape[0] != levels:
            raise BundleError(f"{bundle.path}/{QUANTIZER_FILE}: {quantizer.codebooks.shape[0]} levels of codebooks, "
                              f"the semantic IDs have {levels} raw levels")
        return NewItemCoder("text", levels, embedder=embedder, quantizer=quantizer)
    embeddings = arrays.get("catalog_text_embeddings")
    if embeddings is None or embeddings.shape[0] != bundle.num_items:
        raise BundleError(f"{bundle.path}/{QUANTIZER_FILE}: 'catalog_text_embeddings' must hold one row per item")
    return NewItemCoder("nearest_text_neighbour", levels, embedder=embedder,
                        catalog_embeddings=np.asarray(embeddings, np.float32),
                        catalog_raw_codes=bundle.semantic_ids[:, :-1].astype(np.int64))


def _load_npz(bundle: Bundle) -> dict[str, np.ndarray]:
    try:
        with np.load(bundle.file(QUANTIZER_FILE), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle.path}/{QUANTIZER_FILE}: cannot read as .npz arrays without pickle ({e})") from e
