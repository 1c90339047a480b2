"""The item head: trained beside the codes, and ranking what the beam search found."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.beam import rerank_with_item_head
from training.model import GenerativeRecommender, Seq2SeqConfig

SEMANTIC_IDS = np.array([[0, 1], [0, 2], [1, 0], [2, 2], [3, 1]])


def item_head_model(weight: float = 1.0) -> GenerativeRecommender:
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(codebook_sizes=[4, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1,
                        dropout=0.0, history_item_ids=True, item_count=len(SEMANTIC_IDS), item_head=True,
                        item_head_weight=weight)
    model = GenerativeRecommender(cfg)
    model.set_item_codes(SEMANTIC_IDS)
    return model.eval()


def test_item_tokens_are_the_encoders_item_inputs() -> None:
    model = item_head_model()
    items = torch.arange(len(SEMANTIC_IDS))
    expected = model.embed_history(torch.as_tensor(SEMANTIC_IDS)[None], items[None])[0]
    torch.testing.assert_close(model.item_tokens(), expected)


def test_catalog_codes_must_match_the_configured_catalog() -> None:
    with pytest.raises(ValueError, match="do not match"):
        item_head_model().set_item_codes(SEMANTIC_IDS[:3])


def test_loss_adds_the_next_items_cross_entropy() -> None:
    model = item_head_model()
    items = torch.tensor([[0, 3, 1, 4], [2, 4, 5, 5]])  # 5 = padding
    mask = items < len(SEMANTIC_IDS)
    codes = torch.as_tensor(SEMANTIC_IDS)[items.masked_fill(~mask, 0)]
    loss, targets = model(codes, mask, items)

    model.cfg.item_head = False
    codes_loss, _ = model(codes, mask, items)
    memory = model.encode(codes[:, :-1], mask[:, :-1], items[:, :-1])
    batch, position = mask[:, 1:].nonzero(as_tuple=True)
    item_loss = F.cross_entropy(memory[batch, position] @ model.item_tokens().T, items[:, 1:][batch, position])
    assert targets == 4
    torch.testing.assert_close(loss, codes_loss + item_loss)


@torch.no_grad()
def test_rerank_orders_by_codes_plus_weighted_item_log_probs_and_keeps_dead_beams_last() -> None:
    model = item_head_model(weight=2.0)
    user_state = torch.randn(2, 16)
    items = torch.tensor([[4, 0, 2, -1], [1, 3, -1, -1]])
    scores = torch.tensor([[-1.0, -1.5, -4.0, -1e9], [-0.5, -0.7, -1e9, -1e9]])
    ranked_items, ranked_scores = rerank_with_item_head(model, user_state, items, scores)

    log_probs = model.item_logits(user_state).log_softmax(-1)
    for row in range(2):
        live = items[row] >= 0
        combined = {int(i): float(s + 2.0 * log_probs[row, i]) for i, s in zip(items[row][live], scores[row][live])}
        expected = sorted(combined, key=combined.get, reverse=True)
        assert ranked_items[row, : len(expected)].tolist() == expected
        assert ranked_items[row, len(expected):].tolist() == [-1] * (4 - len(expected))
        np.testing.assert_allclose(ranked_scores[row, : len(expected)].numpy(), [combined[i] for i in expected], rtol=1e-6)
    assert bool((ranked_scores[:, 1:] <= ranked_scores[:, :-1]).all())


def test_models_without_the_head_keep_their_weight_names() -> None:
    """Weight files written before the item head existed must still load."""
    cfg = Seq2SeqConfig(codebook_sizes=[4, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1)
    assert not any("item_codes" in name for name in GenerativeRecommender(cfg).state_dict())
    assert "item_codes" in item_head_model().state_dict()


def _search(model: GenerativeRecommender, beam: int, semantic_ids: np.ndarray, histories: torch.Tensor):
    from service.trie import build_trie
    from training.beam import ConstrainedBeamSearch, trie_tensors

    trie = trie_tensors(build_trie(semantic_ids).as_feeds(), model.cfg.levels)
    items = histories.clamp(max=len(SEMANTIC_IDS) - 1)
    codes = torch.as_tensor(SEMANTIC_IDS)[items]
    with torch.no_grad():
        return ConstrainedBeamSearch(model, beam)(codes, torch.ones_like(items, dtype=torch.bool), items, *trie)


def test_head_candidates_score_exactly_as_the_beam_would_have() -> None:
    """A beam of 2 plus 5 head candidates ranks every item with the score a beam wide enough to
    find them all gives it: the teacher-forced pass renormalizes over the trie as the beam does."""
    histories = torch.tensor([[0, 3, 1], [2, 4, 4], [1, 1, 0]])
    wide_items, wide_scores = _search(item_head_model(), 5, SEMANTIC_IDS, histories)
    narrow = item_head_model()
    narrow.cfg.item_head_candidates = 5
    items, scores = _search(narrow, 2, SEMANTIC_IDS, histories)
    assert items.shape == (3, 2)  # the graph's output keeps the beam's width
    torch.testing.assert_close(items, wide_items[:, :2])
    torch.testing.assert_close(scores, wide_scores[:, :2])


def test_head_candidates_come_only_from_the_trie() -> None:
    """Items outside the (restricted) trie never come back, however the head ranks them."""
    from service.constraints import restricted_trie
    from training.beam import ConstrainedBeamSearch, trie_tensors

    model = item_head_model()
    model.cfg.item_head_candidates = 5
    allowed = np.array([True, False, True, False, True])
    trie = trie_tensors(restricted_trie(SEMANTIC_IDS, allowed).as_feeds(), model.cfg.levels)
    items = torch.tensor([[0, 3, 1], [2, 4, 4]])
    with torch.no_grad():
        found, scores = ConstrainedBeamSearch(model, 4)(torch.as_tensor(SEMANTIC_IDS)[items], torch.ones_like(items, dtype=torch.bool),
                                                        items, *trie)
    for row in found.tolist():
        assert sorted(i for i in row if i >= 0) == [0, 2, 4]
        assert row[3] == -1
