from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import make_synthetic_dataset
from training.embeddings import HashingEncoder
from training.tokenizers import (
    ItemTokenizer,
    RQKMeansTokenizer,
    RQVAETokenizer,
    CatalogCodes,
    ItemViews,
    assign_semantic_ids,
    get_tokenizer,
)

SMALL_RQVAE = dict(hidden=(64, 32), latent_dim=8, levels=3, codebook_size=16, steps=300, batch_size=128,
                   reset_every=50, log_every=50, kmeans_init_iters=5, show_progress=False,
                   threads=1)


@pytest.fixture(scope="module")
def emb() -> np.ndarray:
    ds = make_synthetic_dataset(n_users=10, n_items=400, seed=0)
    return HashingEncoder(48).encode(ds.texts)


def test_assign_semantic_ids_constructed_collision() -> None:
    raw = np.array([[1, 2], [0, 0], [1, 2], [3, 1], [1, 2], [0, 0]], dtype=np.int64)
    codes, rep = assign_semantic_ids(raw, codebook_sizes=[4, 4])
    np.testing.assert_array_equal(codes[:, :2], raw)
    np.testing.assert_array_equal(codes[:, 2], [0, 0, 1, 0, 2, 1])  # item order within each group
    assert len(np.unique(codes, axis=0)) == len(codes)
    assert rep.collisions_before_separation == 5  # three on (1,2), two on (0,0)
    assert rep.n_colliding_groups == 2
    assert rep.max_group_size == 3 and rep.extra_level_size == 3
    assert rep.codebook_sizes == [4, 4, 3]
    assert rep.codes_used == [3, 3] and rep.code_usage == [0.75, 0.75]


def test_assign_semantic_ids_no_collision_and_errors() -> None:
    raw = np.array([[0, 1], [1, 0], [1, 1]])
    codes, rep = assign_semantic_ids(raw)
    assert rep.collisions_before_separation == 0 and rep.max_group_size == 1 and rep.extra_level_size == 1
    assert (codes[:, 2] == 0).all() and rep.codebook_sizes == [2, 2, 1]
    with pytest.raises(ValueError):
        assign_semantic_ids(raw, codebook_sizes=[1, 2])  # code 1 out of range at level 0
    with pytest.raises(ValueError):
        assign_semantic_ids(np.zeros((0, 2)))


@pytest.mark.parametrize("balanced", [False, True])
def test_rqkmeans(emb: np.ndarray, balanced: bool) -> None:
    tok = get_tokenizer("rqkmeans", levels=3, codebook_size=16, iters=10, balanced=balanced)
    assert isinstance(tok, ItemTokenizer) and tok.kind == "rqkmeans"
    rep = tok.fit(ItemViews(text=emb), seed=0)
    codes = tok.encode(ItemViews(text=emb))
    assert codes.shape == (len(emb), 3) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 16
    assert min(rep.code_usage) > 0.9  # 400 items over 16 codes: every code in use
    assert rep.metrics["residual_mse"] < 0.7 * rep.metrics["input_mse"]
    # residual levels keep reducing error
    assert rep.curve[2]["residual_mse"] < rep.curve[0]["residual_mse"]
    sem, srep = assign_semantic_ids(codes, tok.codebook_sizes)
    assert len(np.unique(sem, axis=0)) == len(emb)
    # same seed -> same codes; state round trip -> same codes
    tok2 = RQKMeansTokenizer(levels=3, codebook_size=16, iters=10, balanced=balanced)
    tok2.fit(ItemViews(text=emb), seed=0)
    np.testing.assert_array_equal(tok2.encode(ItemViews(text=emb)), codes)
    tok3 = get_tokenizer("rqkmeans", **tok.params)
    tok3.load_state_dict(tok.state_dict())
    np.testing.assert_array_equal(tok3.encode(ItemViews(text=emb)), codes)


def test_rqkmeans_balanced_is_more_even(emb: np.ndarray) -> None:
    sizes = {}
    for balanced in (False, True):
        tok = RQKMeansTokenizer(levels=1, codebook_size=16, iters=10, balanced=balanced)
        tok.fit(ItemViews(text=emb), seed=1)
        sizes[balanced] = np.bincount(tok.encode(ItemViews(text=emb))[:, 0], minlength=16)
    assert sizes[True].std() < sizes[False].std()


def test_rqvae_trains_and_round_trips(emb: np.ndarray) -> None:
    tok = get_tokenizer("rqvae", **SMALL_RQVAE)
    assert isinstance(tok, RQVAETokenizer) and isinstance(tok, ItemTokenizer)
    rep = tok.fit(ItemViews(text=emb), seed=0)
    # reconstruction improves over training (measured on all items before and after)
    assert rep.metrics["recon_mse"] < 0.8 * rep.metrics["initial_recon_mse"]
    assert rep.curve[-1]["recon_mse"] < rep.curve[0]["recon_mse"]
    codes = tok.encode(ItemViews(text=emb))
    assert codes.shape == (len(emb), 3) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 16
    assert rep.code_usage[0] >= 0.9  # dead-code re-seeding keeps the first level in use
    sem, srep = assign_semantic_ids(codes, tok.codebook_sizes)
    assert len(np.unique(sem, axis=0)) == len(emb)
    assert srep.collisions_before_separation == len(emb) - int(round(rep.unique_fraction * len(emb))) + srep.n_colliding_groups
    # rebuild from manifest params + state dict: identical codes and reconstructions
    state = tok.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    tok2 = get_tokenizer("rqvae", **tok.params)
    tok2.load_state_dict(state)
    np.testing.assert_array_equal(tok2.encode(ItemViews(text=emb)), codes)
    np.testing.assert_allclose(tok2.reconstruct(emb[:5]), tok.reconstruct(emb[:5]), rtol=1e-5, atol=1e-6)


def test_rqvae_seeded(emb: np.ndarray) -> None:
    cfg = dict(SMALL_RQVAE, steps=60)
    a = RQVAETokenizer(**cfg)
    a.fit(ItemViews(text=emb), seed=5)
    b = RQVAETokenizer(**cfg)
    b.fit(ItemViews(text=emb), seed=5)
    np.testing.assert_array_equal(a.encode(ItemViews(text=emb)), b.encode(ItemViews(text=emb)))


def test_unknown_kind() -> None:
    with pytest.raises(KeyError):
        get_tokenizer("letter-v9")
    with pytest.raises(RuntimeError):
        RQVAETokenizer().encode(ItemViews(text=np.zeros((1, 4), np.float32)))


def test_collision_level_capacity_is_fixed_across_refreshes() -> None:
    codes = CatalogCodes(np.array([[0, 0], [0, 0], [1, 0], [1, 1]]), [2, 2], collision_capacity=3)
    assert codes.codebook_sizes == [2, 2, 3]
    np.testing.assert_array_equal(codes.semantic_ids[:, 2], [0, 1, 0, 0])
    codes.refresh(np.array([[1, 1], [1, 1], [1, 1], [0, 0]]))  # a bigger group, still within the capacity
    assert codes.codebook_sizes == [2, 2, 3] and codes.refreshes == 1
    np.testing.assert_array_equal(codes.semantic_ids[:, 2], [0, 1, 2, 0])
    with pytest.raises(ValueError, match="collision_capacity"):
        codes.refresh(np.zeros((4, 2), dtype=np.int64))  # four items on one tuple, capacity 3
    assert CatalogCodes(np.zeros((4, 2), dtype=np.int64), [2, 2]).codebook_sizes == [2, 2, 4]  # sized to the codes


def test_rqvae_trainable_form_shares_the_tokenizer_weights(emb: np.ndarray) -> None:
    tok = get_tokenizer("rqvae", **dict(SMALL_RQVAE, steps=60))
    views = ItemViews(text=emb)
    tok.fit(views, seed=0)
    trainable = tok.trainable(views)
    np.testing.assert_array_equal(trainable.encode_catalog(), tok.encode(views))
    items = torch.arange(8)
    latents = trainable.module.latents(items)
    dists = trainable.module.code_log_probs(latents, temperature=1.0)
    assert len(dists) == 3 and all(d.shape == (8, 16) for d in dists)
    nearest = torch.stack([d.argmax(1) for d in dists], 1).numpy()
    np.testing.assert_array_equal(nearest, tok.encode(views)[:8])  # the most likely codes are the item's codes
    assert trainable.module.reconstruct(latents).shape == (8, emb.shape[1])
    before = tok.state_dict()["codebooks"].copy()
    optimizer = torch.optim.SGD(trainable.module.parameters(), lr=0.5)
    trainable.module.loss(torch.arange(len(emb))).backward()
    optimizer.step()
    assert not np.array_equal(tok.state_dict()["codebooks"], before)  # the tokenizer sees what its trainable form learned
    np.testing.assert_array_equal(trainable.encode_catalog(), tok.encode(views))
