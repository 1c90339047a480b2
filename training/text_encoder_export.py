"""Put into a bundle what turns a new item's text into codes in the service (service/new_item_codes.py).

- all-MiniLM-L6-v2 as `text_encoder.onnx` (the BERT encoder, mean pooling over real tokens and L2
  normalisation, as `MiniLMEncoder` embeds in training) and its WordPiece tokenizer as
  `text_encoder_tokenizer.json`; the hashing test encoder needs no file (the service has it);
- the tokenizer as plain arrays in `new_item_codes.npz` (never a pickle): residual k-means codebooks,
  or for RQ-VAE / LETTER the encoder MLP's weights, the input standardisation and the codebooks;
- codes from collaborative vectors (or a file) have no text path: the catalog's text embeddings go in
  instead, and a new item takes its nearest catalog item's prefix (docs/architecture.md says why);
- STORE bundles already carry `t2k.onnx`: nothing to add.

The manifest's `tokenizer.new_items` says which, and records a parity check: the service-side codes
of the catalog items' own texts against the codes the bundle holds for them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.bundle import file_digests, load_bundle
from service.new_item_codes import (
    NEW_ITEMS_KEY, QUANTIZER_FILE, TEXT_ENCODER_GRAPH, TEXT_ENCODER_TOKENIZER, load_new_item_coder,
)
from service.text_hashing import hashing_dim
from training.embeddings import DEFAULT_ENCODER, MiniLMEncoder, embed_items, get_text_encoder
from training.graphs import export_onnx

QUANTIZERS = {"rqkmeans": "residual_kmeans", "rqvae": "rqvae_encoder", "letter": "rqvae_encoder"}
PARITY_ITEMS = 2000  # catalog items whose service-side codes are compared at export (a seeded sample)
FALLBACK_REASON = ("the codes come from {features} vectors, which a new item does not have before it has "
                   "interactions: it takes the code prefix of the catalog item nearest by text embedding")


class MeanPooledEncoder(nn.Module):
    """BERT -> mean over the tokens the mask keeps -> unit vector: sentence-transformers' Pooling(mean) + Normalize."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def export_minilm(out_dir: Path) -> int:
    """Writes text_encoder.onnx and text_encoder_tokenizer.json; returns the token limit (the
    sentence-transformers model's max_seq_length, which the service's tokenizer truncates to)."""
    model = MiniLMEncoder(show_progress=False)._load()
    transformer = model[0]
    bert = transformer.auto_model.cpu().eval()
    transformer.tokenizer.backend_tokenizer.save(str(out_dir / TEXT_ENCODER_TOKENIZER))
    encoded = transformer.tokenizer(["an example item", "a second, longer example item text"], padding=True,
                                    return_tensors="pt")
    args = (encoded["input_ids"], encoded["attention_mask"], torch.zeros_like(encoded["input_ids"]))
    axes = {name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        export_onnx(MeanPooledEncoder(bert).eval(), args, out_dir / TEXT_ENCODER_GRAPH,
                    ["input_ids", "attention_mask", "token_type_ids"], ["embeddings"], axes | {"embeddings": {0: "batch"}})
    return int(model.max_seq_length)


def quantizer_arrays(kind: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays service.new_item_codes.ResidualQuantizer applies, from a tokenizer's state_dict."""
    if kind == "rqkmeans":
        return {"codebooks": np.asarray(state["codebooks"], np.float32)}
    keep = [k for k in state if k.startswith("encoder.") or k in ("codebooks", "input_mean", "input_scale")]
    return {k: np.asarray(state[k], np.float32) for k in keep}


def add_text_path(bundle_dir: Path, *, tokenizer_kind: str, tokenizer_state: dict[str, np.ndarray], item_features: str,
                  text_encoder: str, texts: Sequence[str], text_embeddings: np.ndarray | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Adds the new-item text path to a written bundle (texts: the bundle's items' texts, in item
    order) and rewrites its manifest; returns the manifest's tokenizer.new_items section."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    if len(texts) != bundle.num_items:
        raise ValueError(f"{len(texts)} texts for a bundle of {bundle.num_items} items")
    spec: dict[str, Any] = {"text_encoder": text_encoder}
    if "t2k.onnx" in bundle.manifest.files:
        spec = {"codes_from": "t2k"}
    else:
        if hashing_dim(text_encoder) is None:
            if text_encoder not in (DEFAULT_ENCODER, "minilm"):
                raise ValueError(f"text encoder {text_encoder!r} has no ONNX export here (all-MiniLM-L6-v2 or hashing-<dim>)")
            spec["max_tokens"] = export_minilm(bundle_dir)
        if item_features == "text" and tokenizer_kind in QUANTIZERS:
            spec |= {"codes_from": "text", "quantizer": QUANTIZERS[tokenizer_kind]}
            arrays = quantizer_arrays(tokenizer_kind, tokenizer_state)
        else:
            if text_embeddings is None:
                text_embeddings = embed_items(list(texts), get_text_encoder(text_encoder))
            spec |= {"codes_from": "nearest_text_neighbour",
                     "reason": FALLBACK_REASON.format(features=item_features if tokenizer_kind != "precomputed"
                                                      else "precomputed (given by a file)")}
            arrays = {"catalog_text_embeddings": np.asarray(text_embeddings, np.float32)}
        np.savez(bundle_dir / QUANTIZER_FILE, **arrays)
    _rewrite_manifest(bundle_dir, spec)
    if spec["codes_from"] != "nearest_text_neighbour":  # the fallback's own prefix is trivially its nearest
        spec["parity"] = parity(bundle_dir, texts, seed)
        _rewrite_manifest(bundle_dir, spec)
    return spec


def parity(bundle_dir: Path, texts: Sequence[str], seed: int = 0, items: int = PARITY_ITEMS) -> dict[str, Any]:
    """Service-side raw codes of catalog items' own texts against the bundle's codes for them."""
    bundle = load_bundle(bundle_dir)
    coder = load_new_item_coder(bundle)
    n = bundle.num_items
    sample = np.arange(n) if n <= items else np.sort(np.random.default_rng(seed).choice(n, items, replace=False))
    served = np.concatenate([coder.raw_codes([texts[i] for i in sample[s : s + 256]])
                             for s in range(0, len(sample), 256)])
    equal = (served == bundle.semantic_ids[sample, :-1]).all(1)
    return {"items_checked": int(len(sample)), "codes_equal": int(equal.sum())}


def _rewrite_manifest(bundle_dir: Path, spec: dict[str, Any]) -> None:
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    manifest = bundle.manifest
    names = set(manifest.files) | {p.name for p in bundle_dir.iterdir()
                                   if p.name in (TEXT_ENCODER_GRAPH, TEXT_ENCODER_TOKENIZER, QUANTIZER_FILE)}
    tokenizer = {**manifest.tokenizer, NEW_ITEMS_KEY: spec}
    replace(manifest, tokenizer=tokenizer, files=file_digests(bundle_dir, names)).write(bundle_dir)
    for name in names:
        (bundle_dir / name).chmod(0o644)


def add_text_path_to_bundle(bundle_dir: Path, dataset_dir: str | None = None) -> dict[str, Any]:
    """`genrec text-path`: the text path for a bundle exported before it existed, from its manifest,
    tokenizer.safetensors and the dataset's texts (the dataset the manifest names, or dataset_dir)."""
    from safetensors.numpy import load_file

    from training.data import load_dataset

    bundle = load_bundle(bundle_dir)
    dataset = load_dataset(dataset_dir or bundle.dataset)
    text_of = dict(zip(dataset.item_ids, dataset.texts))
    missing = [i for i in bundle.item_ids if i not in text_of]
    if missing:
        raise ValueError(f"{len(missing)} of the bundle's items are not in dataset {dataset.name} (e.g. {missing[:3]})")
    info = bundle.manifest.tokenizer
    state = load_file(str(bundle.file("tokenizer.safetensors")))
    return add_text_path(Path(bundle_dir), tokenizer_kind=info["kind"], tokenizer_state=state,
                         item_features=info.get("item_features", "text"),
                         text_encoder=bundle.manifest.text_encoder or DEFAULT_ENCODER,
                         texts=[text_of[i] for i in bundle.item_ids])

