from __future__ import annotations

import numpy as np
import pytest
import torch

from training.model import GenerativeRecommender, Seq2SeqConfig
from training.tokenizers import CatalogCodes
from training.train import TrainConfig, train_recommender
from training.warm_start import code_tables_from_features, project_features, warm_start_codes, warm_start_items


def _items_built_from_codes(n_items: int = 3000, d_feat: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 16, n_items), rng.integers(0, 8, n_items)], axis=1)
    centres = [rng.standard_normal((16, d_feat)), 0.3 * rng.standard_normal((8, d_feat))]
    features = centres[0][codes[:, 0]] + centres[1][codes[:, 1]]
    return features, codes


def test_summed_code_rows_reconstruct_the_projected_features() -> None:
    features, codes = _items_built_from_codes()
    tables = code_tables_from_features(features, codes, [16, 8], d_model=16, seed=0)
    assert [t.shape for t in tables] == [(16, 16), (8, 16)]
    summed = tables[0][codes[:, 0]] + tables[1][codes[:, 1]]
    assert np.sqrt((summed**2).mean()) == pytest.approx(0.04, rel=0.1)
    # Items with equal features get equal sums; the sums keep the features' geometry (an isometry, scaled).
    centred = features - features.mean(0)
    scale = np.linalg.norm(summed) / np.linalg.norm(centred)
    gram_features = centred[:200] @ centred[:200].T * scale**2
    gram_sums = summed[:200] @ summed[:200].T
    assert np.abs(gram_sums - gram_features).max() < 0.1 * np.abs(gram_features).max()


def test_wide_features_are_projected_on_their_leading_directions() -> None:
    features, codes = _items_built_from_codes(d_feat=64)
    tables = code_tables_from_features(features, codes, [16, 8], d_model=16, seed=0)
    assert tables[0].shape == (16, 16) and np.isfinite(tables[0]).all()


def test_warm_start_fills_embeddings_and_heads_but_leaves_unused_codes() -> None:
    features, codes = _items_built_from_codes()
    codes[:, 1] = np.minimum(codes[:, 1], 5)  # codes 6 and 7 of level 1 unused
    model = GenerativeRecommender(Seq2SeqConfig(codebook_sizes=[16, 8], d_model=16, n_heads=2, d_ff=32,
                                                encoder_layers=1, decoder_layers=1))
    before = model.code_embeddings[1].weight.detach().clone()
    tables = code_tables_from_features(features, codes, [16, 8], d_model=16, seed=0)
    warm_start_codes(model, tables)
    assert torch.allclose(model.code_embeddings[0].weight, torch.as_tensor(tables[0]))
    assert torch.allclose(model.heads[1].weight[:6], torch.as_tensor(tables[1][:6]))
    assert torch.equal(model.code_embeddings[1].weight[6:], before[6:])


def test_warm_start_without_features_is_refused() -> None:
    codes = CatalogCodes(np.zeros((4, 2), dtype=np.int64), [2, 2])
    with pytest.raises(ValueError, match="item features"):
        train_recommender(Seq2SeqConfig(codebook_sizes=[2, 2], d_model=8, n_heads=2, d_ff=16),
                          TrainConfig(epochs=1, init_codes_from_features=True), [np.array([0, 1, 2])],
                          [np.array([0])], np.array([1]), codes, progress=False)


def test_item_rows_complete_the_codes_to_the_projected_features() -> None:
    features, codes = _items_built_from_codes(n_items=500)
    features = features + 0.05 * np.random.default_rng(1).standard_normal(features.shape)  # beyond what codes say
    model = GenerativeRecommender(Seq2SeqConfig(codebook_sizes=[16, 8], d_model=16, n_heads=2, d_ff=32,
                                                encoder_layers=1, decoder_layers=1,
                                                history_item_ids=True, item_count=len(codes)))
    tables = code_tables_from_features(features, codes, [16, 8], d_model=16, seed=0)
    warm_start_codes(model, tables)
    warm_start_items(model, features, codes, tables, seed=0)
    items = torch.arange(len(codes))[None]
    with torch.no_grad():
        tokens = model.embed_history(torch.as_tensor(codes)[None], items)[0].numpy()
        codes_only = model.embed_items(torch.as_tensor(codes)).numpy()
    projected = project_features(features, 16, seed=0)
    np.testing.assert_allclose(tokens, projected, atol=1e-5)
    assert np.abs(codes_only - projected).max() > 1e-3  # the item rows carry what the codes miss
    assert torch.equal(model.item_embeddings.weight[-1], torch.zeros(16))  # the padding row


def test_a_model_with_item_ids_refuses_histories_without_them() -> None:
    model = GenerativeRecommender(Seq2SeqConfig(codebook_sizes=[4, 4], d_model=8, n_heads=2, d_ff=16,
                                                encoder_layers=1, decoder_layers=1, history_item_ids=True, item_count=5))
    with pytest.raises(ValueError, match="history_items"):
        model.encode(torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="item_count"):
        GenerativeRecommender(Seq2SeqConfig(codebook_sizes=[4, 4], history_item_ids=True))
