"""`genrec seeds`: several seeds of one configuration, summarized as mean and spread."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import make_synthetic_dataset, write_dataset
from training.seeds import METRICS, log_path, markdown_row, read_summary, run_seeds, summarize


def test_two_seeds_side_by_side_give_mean_and_spread_of_their_own_results(tmp_path: Path) -> None:
    data = write_dataset(make_synthetic_dataset(n_users=120, n_items=40, seed=0), tmp_path / "data")
    logs = tmp_path / "logs"
    run_seeds("tiny", [0, 1], logs, ["--dataset", str(data), "--models-dir", str(tmp_path / "models")], parallel=True)
    runs = [read_summary(log_path(logs, "tiny", seed)) for seed in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1]
    summary = summarize(runs)
    for split in ("valid", "test"):
        for metric in METRICS:
            values = [r[split][metric] for r in runs]
            assert summary[split][metric]["mean"] == pytest.approx(sum(values) / 2)
            assert summary[split][metric]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    row = markdown_row(summary)
    assert row.startswith("| ") and "2 seeds [0, 1]" in row and row.count("±") == 4
    assert json.loads(json.dumps(summary))["seeds"] == [0, 1]


def test_a_log_without_a_summary_line_is_named(tmp_path: Path) -> None:
    log = tmp_path / "x-s0.log"
    log.write_text("epoch 1 ...\n")
    with pytest.raises(SystemExit, match="x-s0.log"):
        read_summary(log)
