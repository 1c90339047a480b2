"""LETTER's tokenizer: its regularisers, the balanced last level, and what the collaborative loss
does to the codes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.tokenizers import ItemViews, LetterTokenizer, get_tokenizer
from training.tokenizers.diagnostics import code_neighbour_similarity, mean_pair_cosine
from training.tokenizers.letter import diversity_loss, sinkhorn_codes

SMALL = dict(hidden=(32,), latent_dim=8, levels=2, codebook_size=8, steps=300, batch_size=128, reset_every=50,
             log_every=50, kmeans_init_iters=5, show_progress=False, threads=1)


@pytest.fixture(scope="module")
def views() -> ItemViews:
    """Texts that say nothing of the collaborative groups: 8 groups of co-purchased items."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 8, 400)
    collaborative = np.eye(8)[groups] * 3 + 0.3 * rng.standard_normal((400, 8))
    return ItemViews(text=rng.standard_normal((400, 24)).astype(np.float32),
                     collaborative=collaborative.astype(np.float32))


def test_the_collaborative_loss_puts_co_purchased_items_on_one_first_code(views: ItemViews) -> None:
    plain = get_tokenizer("letter", **SMALL, lr=1e-2, cf_weight=0.0, diversity_weight=0.0, sinkhorn_epsilon=0.0)
    letter = get_tokenizer("letter", **SMALL, lr=1e-2, cf_weight=1.0, diversity_weight=0.0)
    assert letter.views == {"text", "collaborative"} and plain.views == {"text"}
    plain.fit(views, seed=0)
    report = letter.fit(views, seed=0)
    assert report.kind == "letter" and report.curve[-1]["cf_loss"] < report.curve[0]["cf_loss"]
    with_cf = code_neighbour_similarity(letter.encode(views), views.collaborative)
    without = code_neighbour_similarity(plain.encode(views), views.collaborative)
    assert with_cf["first_code_pair_cosine"] > without["first_code_pair_cosine"] + 0.1
    assert abs(with_cf["random_pair_cosine"] - without["random_pair_cosine"]) < 1e-9  # the same items


def test_state_round_trip_keeps_codes_and_the_collaborative_map(views: ItemViews) -> None:
    letter = get_tokenizer("letter", **dict(SMALL, steps=60), cf_weight=0.5, diversity_weight=1e-2)
    report = letter.fit(views, seed=1)
    assert "diversity_loss" in report.curve[-1]
    again = get_tokenizer("letter", **letter.params)
    again.load_state_dict(letter.state_dict())
    np.testing.assert_array_equal(again.encode(views), letter.encode(views))
    assert isinstance(again, LetterTokenizer) and torch.equal(again.cf_map.weight, letter.cf_map.weight)


def test_the_collaborative_loss_needs_the_collaborative_view() -> None:
    with pytest.raises(ValueError, match="collaborative"):
        get_tokenizer("letter", **SMALL).fit(ItemViews(text=np.zeros((10, 4), np.float32)), seed=0)


def test_diversity_pulls_towards_a_code_of_the_same_cluster() -> None:
    torch.manual_seed(0)
    codebook = torch.randn(6, 4, requires_grad=True)
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])  # code 5 is alone in its cluster: no positive
    codes = torch.tensor([0, 3, 5, 1])
    loss = diversity_loss(codebook[codes], codes, codebook, clusters, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and codebook.grad[5].abs().sum() > 0  # code 5 is a negative of the others
    # with every code alone in its cluster nothing has a positive
    assert diversity_loss(codebook[codes], codes, codebook, torch.arange(6), torch.Generator()).item() == 0.0
    # the positive is never the item's own code and always from its cluster: a cluster of two codes
    # leaves one choice, so the loss equals cross-entropy towards that code
    pair = torch.tensor([0, 0, 1, 1, 2, 2])
    codes = torch.tensor([0, 3])
    logits = (codebook[codes] @ codebook.T).detach()
    logits[0, 0] = logits[1, 3] = float("-inf")
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2]))
    got = diversity_loss(codebook[codes], codes, codebook, pair, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.detach(), expected)


def test_sinkhorn_spreads_a_batch_that_one_code_would_take() -> None:
    rng = np.random.default_rng(0)
    d2 = torch.as_tensor(rng.uniform(0.5, 1.0, (64, 8)))
    d2[:, 0] = 0.1  # every item is nearest to code 0
    nearest = torch.bincount(d2.argmin(1), minlength=8)
    balanced = torch.bincount(sinkhorn_codes(d2, epsilon=0.05, iters=50), minlength=8)
    assert nearest.max() == 64 and balanced.max() <= 16


def test_pair_cosine_is_exact() -> None:
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    assert mean_pair_cosine(vectors, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert mean_pair_cosine(vectors, np.zeros(4, dtype=int)) == pytest.approx(2 / 6)
