"""`genrec export --bundle`: graphs rebuilt from the bundle's weights serve the same answers."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle
from service.engine import OnnxBeamEngine
from training.cli import main as genrec


def test_export_rebuilds_graphs_in_place_with_fresh_digests(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    before = OnnxBeamEngine(load_bundle(copy), providers="cpu")
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, before.trained_items, size=n) for n in (1, 3, 7, 12)]
    expected_items, expected_scores = before.search(histories)

    graph = copy / "beam_search.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])  # a broken graph: the rebuild must replace it
    assert genrec(["export", "--bundle", str(copy)]) == 0

    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["files"]["beam_search.onnx"] == hashlib.sha256(graph.read_bytes()).hexdigest()
    after = OnnxBeamEngine(load_bundle(copy), providers="cpu")  # checksums verified on load
    items, scores = after.search(histories)
    np.testing.assert_array_equal(items, expected_items)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("options", [("model.decoder_start_from_history=true",), ("model.item_head=true",),
                                     ("model.item_head=true", "model.item_head_candidates=6")])
def test_item_ids_and_a_history_start_export_and_serve_what_torch_ranks(tmp_path: Path, options: tuple[str, ...]) -> None:
    """The options change the graphs (a history_items input; the decoder's first input reads the
    newest memory row; the item head re-ranks the beam's items in the graph, and the encoder graph
    returns the reference's item_bonus; head candidates add the head's best items the beam missed,
    scored by a teacher-forced decoder pass): the served top-10 must still be torch's, and the
    reference engine's."""
    from service.reference import ReferenceBeamEngine
    from training.configs import apply_overrides, get_config
    from training.data import make_synthetic_dataset, write_dataset
    from training.pipeline import run_pipeline

    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), tmp_path / "data")
    cfg = apply_overrides(get_config("tiny", str(data_dir)),
                          ["model.history_item_ids=true", *options, "train.init_codes_from_features=true"])
    summary = run_pipeline(cfg, seed=0, models_dir=tmp_path / "models", progress=False)
    check = summary["export_check"]
    assert check["served_top10_equal"] == check["users_checked"] > 0
    assert check["encoder_max_abs_diff"] < 1e-4

    bundle = load_bundle(Path(summary["bundle"]))
    fast = OnnxBeamEngine(bundle, providers="cpu")
    assert "history_items" in {i.name for i in fast.session.get_inputs()}
    reference = ReferenceBeamEngine(bundle, providers="cpu")
    has_head = "model.item_head=true" in options
    assert ("item_bonus" in reference._encoder_outputs) == has_head
    assert ("test_codes_only" in summary) == has_head
    histories = [np.array([3, 1, 4]), np.array([59]), np.arange(25) % 60]
    items, scores = fast.search(histories)
    reference_items, reference_scores = reference.search(histories)
    np.testing.assert_array_equal(items[:, :10], reference_items[:, :10])
    np.testing.assert_allclose(scores[:, :10], reference_scores[:, :10], atol=1e-4)
    if options == ("model.item_head=true",):  # switched on after training: re-export, no retraining
        assert genrec(["export", "--bundle", summary["bundle"], "--item-head-candidates", "6"]) == 0
        bundle = load_bundle(Path(summary["bundle"]))
        assert bundle.manifest.model["config"]["item_head_candidates"] == 6
        items, _ = OnnxBeamEngine(bundle, providers="cpu").search(histories)
        np.testing.assert_array_equal(items[:, :10], ReferenceBeamEngine(bundle, providers="cpu").search(histories)[0][:, :10])


def test_the_bundle_tokenizer_gives_an_item_its_codes_from_its_text(tiny_bundle: Path) -> None:
    """tokenizer.safetensors + the manifest rebuild the tokenizer: a catalog item's text, embedded
    with the bundle's text encoder, gets the item's codes (the collision level aside)."""
    from training.data import load_dataset
    from training.embeddings import embed_items, get_text_encoder
    from training.tokenizers import ItemViews, load_bundle_tokenizer

    bundle = load_bundle(tiny_bundle)
    tokenizer = load_bundle_tokenizer(tiny_bundle)
    dataset = load_dataset(str(tiny_bundle.parents[2] / "data"))
    assert dataset.item_ids == bundle.item_ids
    text = embed_items(dataset.texts, get_text_encoder(bundle.manifest.text_encoder))
    np.testing.assert_array_equal(tokenizer.encode(ItemViews(text=text)), bundle.semantic_ids[:, :-1])


def test_the_bundle_writes_the_tokenizer_fit_and_names_the_model_kind(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest.model["kind"] == "seq2seq"
    fit = json.loads(bundle.file("tokenizer_fit.json").read_text())
    assert fit["kind"] == bundle.manifest.tokenizer["kind"] and fit["n_items"] == bundle.num_items
    assert len(fit["curve"]) > 0


def test_a_letter_bundle_with_a_ranking_temperature_serves_what_torch_ranks(tmp_path: Path) -> None:
    """LETTER codes (text view + the collaborative loss) and the ranking-guided loss with the
    temperature in decoding too: the export check holds and the code quality figures are kept."""
    from training.configs import apply_overrides, get_config
    from training.data import make_synthetic_dataset, write_dataset
    from training.pipeline import run_pipeline

    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), tmp_path / "data")
    cfg = apply_overrides(get_config("tiny", str(data_dir)), [
        "tokenizer=letter", 'tokenizer_params={"levels": 2, "codebook_size": 8, "hidden": [16], "latent_dim": 8, '
        '"steps": 60, "batch_size": 32, "show_progress": false}',
        "model.code_loss_temperature=0.8", "model.decode_with_temperature=true"])
    summary = run_pipeline(cfg, seed=0, models_dir=tmp_path / "models", progress=False)
    check = summary["export_check"]
    assert check["served_top10_equal"] == check["users_checked"] > 0
    bundle = load_bundle(Path(summary["bundle"]))
    quality = bundle.manifest.metrics["code_quality"]
    assert quality["collisions_before_separation"] >= 0 and len(quality["code_usage"]) == 2
    assert -1.0 <= quality["random_pair_cosine"] <= quality["first_code_pair_cosine"] + 1.0
    assert bundle.manifest.tokenizer["kind"] == "letter"
    # the floors and SASRec on the same split sit beside the model
    assert set(summary["floors"]) == {"most popular", "last-item transitions", "SASRec"}
    assert bundle.manifest.metrics["floors"] == summary["floors"]


def test_the_floors_table_warns_in_bold_when_the_model_is_below_a_floor() -> None:
    from training.pipeline import floors_table

    def row(r10: float, n10: float) -> dict:
        return {"recall@10": r10, "ndcg@10": n10}

    floors = {"most popular": {"valid": row(0.02, 0.01), "test": row(0.02, 0.01)},
              "last-item transitions": {"valid": row(0.09, 0.05), "test": row(0.08, 0.05)},
              "SASRec": {"valid": row(0.2, 0.1), "test": row(0.2, 0.1)}}
    table = floors_table(row(0.10, 0.04), row(0.1, 0.04), floors)
    assert "| this model | 0.1000 | 0.0400 |" in table
    assert "**WARNING: this model is below the last-item transitions floor" in table  # N@10 .04 < .05
    assert "WARNING" not in floors_table(row(0.10, 0.06), row(0.1, 0.06), floors)  # SASRec is no floor


def test_the_pipeline_keeps_item_head_candidates_only_when_validation_says_so(tmp_path: Path) -> None:
    """choose_item_head_candidates: both settings are scored on validation, the better NDCG@10 is
    kept in the figures and exported in the bundle, whose served top-10 is still torch's."""
    from training.configs import apply_overrides, get_config
    from training.data import make_synthetic_dataset, write_dataset
    from training.pipeline import run_pipeline

    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), tmp_path / "data")
    cfg = apply_overrides(get_config("tiny", str(data_dir)),
                          ["model.history_item_ids=true", "model.item_head=true", "choose_item_head_candidates=true"])
    summary = run_pipeline(cfg, seed=0, models_dir=tmp_path / "models", progress=False)
    choice = summary["item_head_candidates"]
    better = choice["valid_with"]["ndcg@10"] > choice["valid_without"]["ndcg@10"]
    assert choice["chosen"] == (cfg.beam_size if better else 0)
    assert summary["valid"] == (choice["valid_with"] if better else choice["valid_without"])
    bundle = load_bundle(Path(summary["bundle"]))
    assert bundle.manifest.model["config"]["item_head_candidates"] == choice["chosen"]
    assert summary["export_check"]["served_top10_equal"] == summary["export_check"]["users_checked"] > 0


def test_the_pipeline_fuses_transitions_only_when_validation_says_so(tmp_path: Path) -> None:
    """choose_transition_fusion: each weight is scored on validation against the beam alone; the best
    is kept (in the figures, the manifest and the bundle's successor lists) only if NDCG@10 rises."""
    from training.baselines import successor_lists
    from training.configs import apply_overrides, get_config
    from training.data import leave_one_out, load_dataset, make_synthetic_dataset, write_dataset
    from training.pipeline import TRANSITION_LIST_SIZE, run_pipeline

    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), tmp_path / "data")
    cfg = apply_overrides(get_config("tiny", str(data_dir)), ["choose_transition_fusion=true"])
    summary = run_pipeline(cfg, seed=0, models_dir=tmp_path / "models", progress=False)
    choice = summary["transition_fusion"]
    best = max(choice["valid_by_weight"].values(), key=lambda metrics: metrics["ndcg@10"])
    fused = best["ndcg@10"] > choice["valid_without"]["ndcg@10"]
    assert (choice["weight"] > 0) == fused
    assert summary["valid"] == (best if fused else choice["valid_without"])
    bundle = load_bundle(Path(summary["bundle"]))
    if not fused:
        assert bundle.fusion is None and bundle.manifest.fusion == {}
        return
    assert bundle.manifest.fusion == {"kind": "transitions", "weight": choice["weight"]}
    dataset = load_dataset(str(data_dir))
    offsets, successors = successor_lists(leave_one_out(dataset, cfg.model.max_history).train_sequences,
                                          dataset.n_items, TRANSITION_LIST_SIZE)
    np.testing.assert_array_equal(bundle.fusion.offsets, offsets)
    np.testing.assert_array_equal(bundle.fusion.successors, successors)
    assert "test_without" in choice and summary["export_check"]["served_top10_equal"] > 0


def test_fuse_adds_transition_fusion_to_a_bundle_and_eval_scores_what_is_served(tiny_bundle: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    data_dir = str(tiny_bundle.parents[2] / "data")
    assert genrec(["fuse", "--bundle", str(copy), "--dataset", data_dir]) == 0
    choice = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["transition_fusion"]
    bundle = load_bundle(copy)  # the rewritten digests hold
    if choice["weight"] == 0:
        assert bundle.fusion is None and not (copy / "transition_offsets.npy").exists()
        return
    assert bundle.fusion is not None and bundle.fusion.weight == choice["weight"]
    assert bundle.manifest.metrics["transition_fusion"]["test_with"] == choice["test_with"]
    assert genrec(["eval", "--bundle", str(copy), "--dataset", data_dir]) == 0
    served = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert served["test"] == pytest.approx(choice["test_with"])
    assert served["valid"] == pytest.approx(choice["valid_with"])
