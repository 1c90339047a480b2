"""New items' codes in the service (numpy, onnxruntime, tokenizers) equal what training gives the same text."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle
from service.new_item_codes import NEW_ITEMS_KEY, OnnxTextEncoder, ResidualQuantizer, load_new_item_coder
from training.text_encoder_export import add_text_path, export_minilm, quantizer_arrays
from training.tokenizers import LetterTokenizer, RQKMeansTokenizer, RQVAETokenizer
from training.tokenizers.base import ItemViews


def clustered(n: int = 400, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    x = centres[rng.integers(12, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_residual_kmeans_in_numpy_gives_the_training_codes() -> None:
    x = clustered()
    tokenizer = RQKMeansTokenizer(levels=3, codebook_size=16, iters=10)
    tokenizer.fit(ItemViews(text=x), seed=0)
    quantizer = ResidualQuantizer.from_arrays(quantizer_arrays("rqkmeans", tokenizer.state_dict()))
    assert np.array_equal(quantizer.codes(x), tokenizer.encode(ItemViews(text=x)))


@pytest.mark.parametrize("kind", ["rqvae", "letter"])
def test_the_rqvae_encoder_in_numpy_gives_the_training_codes(kind: str) -> None:
    """RQ-VAE and LETTER (the same encoder and quantiser; LETTER's collaborative map is not needed to encode)."""
    x = clustered(seed=1)
    views = ItemViews(text=x, collaborative=clustered(dim=16, seed=2))
    options = dict(hidden=(32, 16), latent_dim=8, levels=3, codebook_size=16, steps=60, batch_size=128,
                   show_progress=False)
    tokenizer = RQVAETokenizer(**options) if kind == "rqvae" else LetterTokenizer(**options, diversity_clusters=4)
    tokenizer.fit(views, seed=0)
    arrays = quantizer_arrays(kind, tokenizer.state_dict())
    assert not any(k.startswith(("decoder.", "cf_map")) for k in arrays)  # only what encoding needs
    quantizer = ResidualQuantizer.from_arrays(arrays)
    assert len(quantizer.layers) == 3
    assert np.array_equal(quantizer.codes(x), tokenizer.encode(views))


@pytest.mark.slow
def test_every_catalog_item_text_gets_its_own_codes_back(catalog_bundle_dir: Path, catalog_dataset) -> None:
    """The parity check: the service's codes of each item's own text equal the bundle's (training's) codes."""
    bundle = load_bundle(catalog_bundle_dir)
    spec = bundle.manifest.tokenizer[NEW_ITEMS_KEY]
    assert spec["codes_from"] == "text" and spec["text_encoder"] == "hashing-64"
    assert spec["parity"] == {"items_checked": bundle.num_items, "codes_equal": bundle.num_items}
    coder = load_new_item_coder(bundle)
    texts = [catalog_dataset.texts[catalog_dataset.item_ids.index(i)] for i in bundle.item_ids]
    assert np.array_equal(coder.raw_codes(texts), bundle.semantic_ids[:, :-1])


@pytest.mark.slow
def test_collaborative_codes_fall_back_to_the_nearest_item_by_text(catalog_bundle_dir: Path, catalog_dataset,
                                                                   tmp_path: Path) -> None:
    bundle_dir = Path(shutil.copytree(catalog_bundle_dir, tmp_path / "bundle"))
    texts = catalog_dataset.texts
    spec = add_text_path(bundle_dir, tokenizer_kind="rqkmeans", tokenizer_state={}, item_features="collaborative",
                         text_encoder="hashing-64", texts=texts)
    assert spec["codes_from"] == "nearest_text_neighbour" and "collaborative" in spec["reason"]
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["tokenizer"][NEW_ITEMS_KEY]["codes_from"] == "nearest_text_neighbour"
    bundle = load_bundle(bundle_dir)  # checksums of the rewritten manifest hold
    coder = load_new_item_coder(bundle)
    candidates = coder.candidates([texts[7] + " (new colour)"])[0]
    assert candidates[0] == tuple(bundle.semantic_ids[7, :-1])  # its nearest item's prefix first
    assert len(candidates) == len(set(candidates)) > 1  # further neighbours' prefixes for a full collision level


@pytest.mark.slow
def test_minilm_exported_to_onnx_embeds_as_training_does(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 as ONNX, tokenized by the `tokenizers` library from its tokenizer.json: the same
    vectors as sentence-transformers (long texts truncated alike), so the same codes."""
    from training.embeddings import MiniLMEncoder

    max_tokens = export_minilm(tmp_path)
    texts = ["Rose hand cream, 50 ml", "Nitrile gloves, powder free, size M",
             "long " * 400 + "text past the token limit", "ÉCLAT lip gloss — nude"]
    served = OnnxTextEncoder(str(tmp_path / "text_encoder.onnx"), str(tmp_path / "text_encoder_tokenizer.json"),
                             max_tokens).encode(texts)
    trained = MiniLMEncoder(show_progress=False).encode(texts)
    assert served.shape == (4, 384)
    assert np.abs(served - trained).max() < 1e-4
