from __future__ import annotations

import json

import numpy as np
import pytest

from training.baselines import Floors, evaluate_baselines, main, transition_counts
from training.data import Dataset, leave_one_out, make_synthetic_dataset


def _dataset(sequences: list[list[int]], n_items: int) -> Dataset:
    names = [f"item {i}" for i in range(n_items)]
    return Dataset(name="tiny", user_ids=[f"u{u}" for u in range(len(sequences))], item_ids=[str(i) for i in range(n_items)],
                   titles=names, texts=names, sequences=[np.asarray(s) for s in sequences])


def test_transition_counts_sorted_by_count_then_popularity() -> None:
    # 0 -> 1 twice, 0 -> 2 once, 0 -> 3 once; item 3 is more popular than 2 overall.
    train = [np.array([0, 1]), np.array([0, 1]), np.array([0, 2]), np.array([0, 3]), np.array([3, 4]), np.array([3])]
    row_start, successor, counts = transition_counts(train, n_items=5)
    assert successor[row_start[0]:row_start[1]].tolist() == [1, 3, 2]
    assert counts[row_start[0]:row_start[1]].tolist() == [2, 1, 1]
    assert successor[row_start[3]:row_start[4]].tolist() == [4]
    assert row_start[1] == row_start[2] == row_start[3]  # items 1 and 2 were never followed by anything


def test_last_item_transitions_fill_with_popular_items_without_repeats() -> None:
    # Training sequences are items[:-2]; item 5 never has a successor in training.
    sequences = [[0, 1, 2, 7, 8], [0, 1, 2, 7, 8], [3, 1, 5, 9, 9], [4, 1, 6, 6, 6]]
    splits = leave_one_out(_dataset(sequences, 10), max_history=20)
    topk = Floors.from_train(splits.train_sequences, 10).last_item_transitions([np.array([0]), np.array([5])], k=4)
    assert topk[0, 0] == 1  # the only successor of 0
    assert topk[1, 0] == 1  # 5 has none: the most popular item comes first
    for row in topk:
        assert len(set(row.tolist())) == len(row)


def test_transitions_beat_popularity_where_the_next_item_is_the_successor() -> None:
    dataset = make_synthetic_dataset(n_users=400, n_items=60, seed=1)
    splits = leave_one_out(dataset, max_history=20)
    results = evaluate_baselines(splits, dataset.n_items)
    transitions, popular = results["last-item transitions"], results["most popular"]
    # Users step to the cluster successor 80% of the time (make_synthetic_dataset).
    assert transitions["test"]["recall@10"] > 0.6
    assert transitions["test"]["recall@10"] > 3 * popular["test"]["recall@10"]
    # The long tail: the same test figures split by the target's training interactions.
    for row in (transitions, popular):
        by_popularity = row["test_by_popularity"]
        assert by_popularity["all"]["users"] == len(splits.test_targets)
        assert by_popularity["all"]["recall@10"] == pytest.approx(row["test"]["recall@10"])
        assert sum(by_popularity[g]["users"] for g in by_popularity if g != "all") == len(splits.test_targets)
    ranking = Floors.from_train(splits.train_sequences, dataset.n_items).most_popular(splits.test_histories)
    assert (ranking == ranking[0]).all()


def test_cli_prints_table_and_json(capsys) -> None:
    assert main(["--dataset", "scientific"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| baseline | split |")
    summary = json.loads(lines[-1])
    assert set(summary["baselines"]) == {"most popular", "last-item transitions"}
    test = {name: splits["test"]["recall@10"] for name, splits in summary["baselines"].items()}
    assert 0 < test["most popular"] < test["last-item transitions"]
