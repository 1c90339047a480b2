from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import leave_one_out, make_synthetic_dataset
from training.sasrec import (
    SASRec,
    SASRecConfig,
    collate_histories,
    load_item_embeddings,
    main,
    popularity_metrics,
    recommend_topk,
    training_windows,
)


def test_training_windows_cover_every_target_once() -> None:
    seqs = [np.arange(1), np.arange(2), np.arange(5), np.arange(47)]
    windows = training_windows(seqs, max_len=20)
    assert all(2 <= len(w) <= 21 for w in windows)
    assert sum(len(w) - 1 for w in windows) == 0 + 1 + 4 + 46  # every next-item target once
    # the 47-item sequence: cut from its end, stride 20, neighbouring windows share one item
    assert [(int(w[0]), int(w[-1])) for w in windows[-3:]] == [(26, 46), (6, 26), (0, 6)]


def test_causal_and_padding_invariance() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=30, d_model=16, d_ff=32, n_heads=2, dropout=0.0, max_len=8)).eval()
    inputs, lengths = collate_histories([np.array([3, 4, 5]), np.array([3, 4, 5, 6, 7, 9])], max_len=8)
    with torch.no_grad():
        h = model.hidden(inputs)
        alone = model.hidden(inputs[:1, :3])
    # the first three states of row 1 do not see items 6, 7, 9; padding does not change row 0
    torch.testing.assert_close(h[0, :3], h[1, :3])
    torch.testing.assert_close(h[0, :3], alone[0])
    torch.testing.assert_close(model.last_state(inputs, lengths)[0], alone[0, 2])


def test_sasrec_beats_popularity_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.data import write_dataset

    dataset = make_synthetic_dataset(n_users=300, n_items=60, seed=1)
    folder = write_dataset(dataset, tmp_path / "synthetic")
    out = tmp_path / "emb" / "sasrec.safetensors"
    argv = ["--dataset", str(folder), "--seed", "0", "--epochs", "4", "--out", str(out), "--quiet",
            "--d-model", "32", "--d-ff", "64", "--dropout", "0.1", "--lr", "5e-3", "--batch-size", "64"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "sasrec" and summary["epochs_run"] == 4 and 1 <= summary["best_epoch"] <= 4
    assert set(summary["valid"]) == set(summary["test"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}

    splits = leave_one_out(dataset)
    popular = popularity_metrics(splits, dataset.n_items, "test")
    assert summary["test"]["ndcg@10"] > popular["ndcg@10"] + 0.1, (summary["test"], popular)

    embeddings, meta = load_item_embeddings(out)
    assert embeddings.shape == (dataset.n_items, 32) and embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()
    assert meta["dataset"] == "synthetic" and meta["config"]["model"]["d_model"] == 32
    assert meta["test"] == summary["test"]
    assert meta["test_by_popularity"]["all"]["recall@10"] == pytest.approx(summary["test"]["recall@10"])


def test_recommend_topk_is_full_ranking() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=25, d_model=8, d_ff=16, dropout=0.0, max_len=5))
    histories = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([0])]
    top = recommend_topk(model, histories, k=25)
    assert top.shape == (2, 25)
    assert all(sorted(row) == list(range(25)) for row in top)  # history items are not excluded
    inputs, lengths = collate_histories(histories, 5)
    with torch.no_grad():
        scores = model.last_state(inputs, lengths) @ model.item_embeddings().t()
    assert np.array_equal(top[:, 0], scores.argmax(-1).numpy())
