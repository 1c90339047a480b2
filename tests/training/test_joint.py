"""ETEGRec's joint training (training/joint.py): the alignment losses, the schedule, the tokenizer
started from residual k-means codes, the unconstrained search, and a jointly trained bundle."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from service.bundle import load_bundle
from training.evaluation import recommend_topk, unconstrained_topk
from training.extra_losses import CodeAnchor, PreferenceSemanticAlignment, SequenceItemAlignment
from training.joint import JointConfig, joint_phases, trainable_tokenizer
from training.model import GenerativeRecommender, Seq2SeqConfig
from training.tokenizers import ItemViews, get_tokenizer
from training.tokenizers.rqkmeans import sq_distances

SMALL_RQVAE = {"levels": 2, "codebook_size": 8, "hidden": [16], "latent_dim": 8, "steps": 80, "batch_size": 32,
               "show_progress": False}


@pytest.fixture(scope="module")
def fitted() -> tuple:
    emb = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    views = ItemViews(text=emb)
    tokenizer = get_tokenizer("rqvae", **SMALL_RQVAE)
    tokenizer.fit(views, seed=0)
    return tokenizer, views


def test_the_paper_sign_makes_the_nearest_code_likeliest_and_the_official_sign_the_farthest(fitted) -> None:
    tokenizer, views = fitted
    module = tokenizer.trainable(views).module
    latents = module.latents(torch.arange(64))
    first_level = sq_distances(latents, module.model.codebooks[0])
    paper = module.code_log_probs(latents, temperature=1.0)
    official = module.code_log_probs(latents, temperature=1.0, official_sign=True)
    assert torch.equal(paper[0].argmax(1), first_level.argmin(1))
    assert torch.equal(official[0].argmax(1), first_level.argmax(1))
    np.testing.assert_array_equal(torch.stack([p.argmax(1) for p in paper], 1).numpy(), tokenizer.encode(views))


def test_sia_trains_sequences_onto_their_target_items_codes(fitted) -> None:
    """Minimising SIA over the adapter alone moves each sequence's most likely codes onto its target
    item's codes (with the released code's sign it would chase the farthest ones)."""
    tokenizer, views = fitted
    module = tokenizer.trainable(views).module
    for p in module.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    sia = SequenceItemAlignment(1.0, d_model=16, latent_dim=8)
    targets = torch.arange(64)
    memory = torch.randn(64, 3, 16)  # one distinct "history" per target
    states = {"history_memory": memory, "history_valid": torch.ones(64, 3, dtype=torch.bool), "target_items": targets}
    optimizer = torch.optim.Adam(sia.parameters(), lr=1e-2)
    item_codes = torch.as_tensor(tokenizer.encode(views)[:, 0])

    def agreement() -> float:  # sequences whose likeliest first code is their target's
        with torch.no_grad():
            codes = module.code_log_probs(sia.adapter(memory.mean(1)), 1.0)[0].argmax(1)
        return float((codes == item_codes).float().mean())

    before = agreement()
    first = float(sia(states, nn.ModuleDict({"tokenizer": module})).detach())
    for _ in range(300):
        optimizer.zero_grad()
        loss = sia(states, nn.ModuleDict({"tokenizer": module}))
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.3 * first
    assert before < 0.4 < 0.6 < agreement()  # KL matches whole distributions, not only their modes


class _LookupTokenizer(nn.Module):
    """Latents and reconstructions are the rows of a fixed table: PSA's arithmetic in the open."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def latents(self, items: torch.Tensor) -> torch.Tensor:
        return self.table[items]

    def reconstruct(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def test_psa_masks_other_targets_of_the_same_item_out_of_the_negatives() -> None:
    table = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    psa = PreferenceSemanticAlignment(1.0, d_model=2, input_dim=2, temperature=0.5)
    psa.adapter = nn.Identity()
    items = torch.tensor([0, 0, 1])
    states = {"decoder_hidden": table[items][:, None, :], "target_items": items}
    loss = float(psa(states, nn.ModuleDict({"tokenizer": _LookupTokenizer(table)})))
    # Item 0's two rows keep one negative (item 1), not each other; item 1's row has two (both of
    # item 0's). The matrix is symmetric, so both directions give the same mean.
    positive, negative = np.exp(1 / 0.5), np.exp(float(table[0] @ table[1]) / 0.5)
    expected = np.mean([-np.log(positive / (positive + negative))] * 2 + [-np.log(positive / (positive + 2 * negative))])
    assert loss == pytest.approx(expected, rel=1e-5)


def test_the_alternating_schedule_and_its_ablations() -> None:
    phases = joint_phases(JointConfig(warmup_epochs=2, cycle=3, alternating_epochs=6))
    assert [(p.name, p.epochs, p.train) for p in phases] == [
        ("warmup", 2, ("recommender",)),
        ("tokenizer", 1, ("tokenizer",)), ("recommender", 2, ("recommender",)),
        ("tokenizer", 1, ("tokenizer",)), ("recommender", 2, ("recommender",)),
        ("finetune", None, ("recommender",))]
    assert phases[1].losses == ("tokenizer", "sia", "psa") and phases[2].losses == ("sia", "psa")
    assert phases[-1].losses == ()
    assert [p.name for p in joint_phases(JointConfig(schedule="frozen"))] == ["recommender"]
    together = joint_phases(JointConfig(schedule="simultaneous", sia_weight=0))
    assert together[1].train == ("recommender", "tokenizer") and together[1].losses == ("tokenizer", "psa")
    anchored = joint_phases(JointConfig(warmup_epochs=0, cycle=2, alternating_epochs=2, code_anchor_weight=0.1))
    assert anchored[0].losses == ("tokenizer", "code_anchor", "sia", "psa") and anchored[1].losses == ("sia", "psa")
    with pytest.raises(ValueError, match="unknown joint schedule"):
        JointConfig(schedule="sometimes")


def test_the_code_anchor_pulls_items_back_onto_their_starting_codes(fitted) -> None:
    """Start every item one code away at the first level: minimising the anchor over the tokenizer
    brings most of them onto the codes they started from."""
    tokenizer, views = copy.deepcopy(fitted)  # other tests freeze the shared tokenizer; this one edits it
    module = tokenizer.trainable(views).module
    module.requires_grad_(True)
    start = torch.as_tensor(tokenizer.encode(views))
    anchor = CodeAnchor(1.0, start)
    with torch.no_grad():  # move the first codebook so many items now quantize elsewhere
        module.model.codebooks[0].copy_(module.model.codebooks[0].roll(1, dims=0))
    items = torch.arange(len(start))

    def first_level_kept() -> float:
        nearest = module.code_log_probs(module.latents(items), 1.0)[0].argmax(1)
        return float((nearest == start[:, 0]).float().mean())

    before = first_level_kept()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    parts = nn.ModuleDict({"tokenizer": module})
    for _ in range(150):
        optimizer.zero_grad()
        anchor({"target_items": items}, parts).backward()
        optimizer.step()
    assert before < 0.5 and first_level_kept() > 0.9


def test_residual_kmeans_becomes_a_trainable_tokenizer_with_the_same_codes() -> None:
    emb = np.random.default_rng(1).normal(size=(80, 6)).astype(np.float32)
    views = ItemViews(collaborative=emb)
    kmeans = get_tokenizer("rqkmeans", input_view="collaborative", levels=2, codebook_size=8, iters=10)
    kmeans.fit(views, seed=0)
    converted = trainable_tokenizer(kmeans)
    np.testing.assert_array_equal(converted.encode(views), kmeans.encode(views))
    np.testing.assert_array_equal(converted.trainable(views).encode_catalog(), kmeans.encode(views))
    with pytest.raises(ValueError, match="joint training needs"):
        trainable_tokenizer(get_tokenizer("precomputed", path="x.json"))


def test_unconstrained_search_equals_the_constrained_one_when_every_code_tuple_is_an_item() -> None:
    """With every tuple in the catalog, the trie removes nothing (renormalising over all children is
    no change): the two searches rank alike. Over a sparse catalog, non-items come back as -1."""
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(codebook_sizes=[4, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1,
                        dropout=0.0)
    model = GenerativeRecommender(cfg).eval()
    every_tuple = np.array([[a, b] for a in range(4) for b in range(3)])
    histories = [np.array([1, 5, 7]), np.array([0]), np.array([11, 2])]
    constrained, _ = recommend_topk(model, histories, every_tuple, beam_size=6)
    np.testing.assert_array_equal(unconstrained_topk(model, histories, every_tuple, beam_size=6), constrained)
    sparse = every_tuple[::3]  # 4 items
    free = unconstrained_topk(model, [h % 4 for h in histories], sparse, beam_size=6)
    assert ((free == -1) | ((free >= 0) & (free < 4))).all() and (free == -1).any()


def test_a_jointly_trained_bundle_keeps_the_trained_codes_and_tokenizer(tmp_path: Path) -> None:
    """ETEGRec end to end on a tiny catalog: codes change during training, the bundle's semantic IDs
    are the trained tokenizer's codes, the served top-10 is torch's, and the unconstrained figures
    sit beside the constrained ones."""
    from training.configs import apply_overrides, get_config
    from training.data import load_dataset, make_synthetic_dataset, write_dataset
    from training.item_features import collaborative_embeddings
    from training.pipeline import run_pipeline
    from training.tokenizers import load_bundle_tokenizer

    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), tmp_path / "data")
    cfg = apply_overrides(get_config("tiny", str(data_dir)), [
        "tokenizer=rqvae", "item_features=collaborative", "collision_capacity=40", "evaluate_unconstrained=true",
        f"tokenizer_params={json.dumps(SMALL_RQVAE)}", 'joint={"warmup_epochs": 1, "alternating_epochs": 2}',
        "train.epochs=4", "train.tokenizer_lr=0.05"])
    summary = run_pipeline(cfg, seed=0, models_dir=tmp_path / "models", progress=False)
    assert summary["export_check"]["served_top10_equal"] == summary["export_check"]["users_checked"] > 0
    assert summary["tokenizer"]["items_recoded_by_joint_training"] > 0
    assert 0.0 <= summary["test_unconstrained"]["invalid@10"] <= 1.0
    curve = [json.loads(line) for line in (Path(summary["bundle"]) / "training_curve.jsonl").read_text().splitlines()]
    assert [point["phase"] for point in curve] == ["warmup", "tokenizer", "recommender", "finetune"]
    assert curve[1]["codes_refreshed"] and "sia_loss" in curve[1] and "psa_loss" in curve[2]

    bundle = load_bundle(Path(summary["bundle"]))
    assert bundle.manifest.name == cfg.name and bundle.manifest.tokenizer["kind"] == "rqvae"
    tokenizer = load_bundle_tokenizer(Path(summary["bundle"]))
    collaborative = collaborative_embeddings(load_dataset(str(data_dir)), cfg.collaborative_seed, progress=False)
    np.testing.assert_array_equal(tokenizer.encode(ItemViews(collaborative=collaborative)), bundle.semantic_ids[:, :-1])
    assert bundle.manifest.metrics["test_unconstrained"] == summary["test_unconstrained"]


def test_a_sticky_refresh_keeps_codes_that_are_nearly_as_close_and_moves_the_rest(fitted) -> None:
    tokenizer, views = fitted
    trainable = copy.deepcopy(tokenizer).trainable(views)
    before = trainable.encode_catalog()
    with torch.no_grad():  # training moves the codebooks a little
        trainable.module.model.codebooks.add_(0.3 * torch.randn_like(trainable.module.model.codebooks,
                                                                      generator=torch.Generator().manual_seed(0)))
    fresh = trainable.encode_catalog()
    trainable.keep_margin = 0.5
    sticky = trainable.encode_catalog(previous=before)
    moved_fresh, moved_sticky = (fresh != before).any(1), (sticky != before).any(1)
    assert moved_sticky.sum() < moved_fresh.sum() and moved_fresh.any()
    # Every kept code is within the margin, every moved one is the nearest (checked at the first level).
    z = trainable.module.model.encoder(trainable.module.inputs).detach()
    d2 = sq_distances(z, trainable.module.model.codebooks[0].detach())
    rows = torch.arange(len(d2))
    kept = torch.as_tensor(sticky[:, 0] == before[:, 0])
    nearest = d2.min(1).values
    assert bool((d2[rows, torch.as_tensor(sticky[:, 0])][kept] <= 1.5 * nearest[kept] + 1e-6).all())
    assert bool((d2[rows, torch.as_tensor(sticky[:, 0])][~kept] <= nearest[~kept] + 1e-6).all())
    trainable.keep_margin = 0.0  # no margin: the same codes as a fresh encode
    np.testing.assert_array_equal(trainable.encode_catalog(previous=before), fresh)
