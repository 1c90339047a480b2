"""The new-item split: held-out items never reach training, groups are what they say, and any
text-view configuration runs on it end to end (`genrec new-items`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.data import item_popularity, leave_one_out, make_synthetic_dataset, write_dataset
from training.splits import content_knn, group_metrics, new_item_split, stratified_held_out, with_new_items_by_prefix
from training.tokenizers import assign_semantic_ids


def test_held_out_items_are_drawn_from_every_popularity_stratum() -> None:
    popularity = np.arange(1000)  # item i has i interactions
    held = stratified_held_out(popularity, 0.05, np.random.default_rng(0))
    assert len(held) == 50
    # 20 strata of 50 items, 2 or 3 from each: head and tail alike
    strata = np.array_split(np.arange(1000), 20)
    per_stratum = [np.isin(held, s).sum() for s in strata]
    assert min(per_stratum) >= 2 and max(per_stratum) <= 3


def test_held_out_items_appear_only_as_test_targets() -> None:
    dataset = make_synthetic_dataset(400, 80, seed=1)
    split = new_item_split(dataset, max_history=20, fraction=0.1, seed=0)
    held = set(split.held_out.tolist())
    assert len(held) == 8
    assert not held & set(np.concatenate(split.splits.train_sequences).tolist())
    assert not held & set(np.concatenate(split.splits.valid_histories + split.splits.test_histories).tolist())
    assert not held & set(split.splits.valid_targets.tolist())
    assert split.train_counts[split.held_out].sum() == 0
    np.testing.assert_array_equal(split.train_counts, item_popularity(split.splits.train_sequences, 80))
    groups = split.test_groups()
    new = groups["new_target"]
    assert new.any() and (~new).any()
    np.testing.assert_array_equal(new, np.isin(split.splits.test_targets, split.held_out))
    # the known-target buckets partition the known targets
    assert (groups["tail<=5"].astype(int) + groups["6-20"] + groups[">20"] == groups["known_target"]).all()
    # users keep their leave-one-out targets
    base = leave_one_out(dataset, 20)
    np.testing.assert_array_equal(split.splits.test_targets, base.test_targets[split.test_users])


def test_group_metrics_and_content_knn() -> None:
    ranked = np.array([[1, 2] + [9] * 8, [3, 4] + [9] * 8])
    out = group_metrics(ranked, np.array([2, 7]), {"a": np.array([True, False]), "b": np.array([False, True])})
    assert out["a"]["recall@10"] == 1.0 and out["a"]["ndcg@10"] == 1 / np.log2(3) and out["a"]["users"] == 1
    assert out["b"]["recall@10"] == 0.0
    x = np.eye(12, dtype=np.float32)
    x[5] = x[3] + 0.1  # item 5 is the closest to item 3
    top = content_knn(x, [np.array([0, 3])], k=10)
    assert top[0, 0] == 5 and 3 not in top[0]


def test_new_items_enter_after_the_ranked_item_sharing_their_deepest_prefix_within_their_share() -> None:
    # 3 content levels + the collision level; items 5, 6 and 7 are new.
    ids = np.array([[0, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0], [1, 1, 2, 0], [2, 2, 2, 0],
                    [0, 0, 1, 1], [1, 1, 3, 0], [3, 3, 3, 0]])
    ranked = np.array([[2, 1, 0, 3, 4, -1]])
    out = with_new_items_by_prefix(ranked, ids, np.array([5, 6, 7]), share=0.2, k=10)
    # item 2 shares two levels with new item 6; item 1 all three content levels with new item 5;
    # new item 7 shares no two levels with anything ranked and stays out.
    assert out[0].tolist() == [2, 6, 1, 5, 0, 3, 4, -1, -1, -1]
    # at most floor(share * k) new items
    assert with_new_items_by_prefix(ranked, ids, np.array([5, 6, 7]), share=0.1, k=10)[0].tolist()[:4] == [2, 6, 1, 0]
    # a known ranking with no new items is kept as it is
    assert with_new_items_by_prefix(ranked, ids, np.array([], dtype=int), k=5)[0].tolist() == [2, 1, 0, 3, 4]


def test_new_items_get_collision_codes_after_the_known_ones() -> None:
    raw = np.array([[0, 0], [0, 0], [1, 0], [0, 0]])
    arrival = np.array([1, 2, 3, 0])  # item 0 is new: it arrives last
    codes, report = assign_semantic_ids(raw, [2, 1], arrival_order=arrival)
    assert codes[:, -1].tolist() == [2, 0, 0, 1]
    assert report.max_group_size == 3


def test_a_text_view_configuration_runs_on_the_new_item_split(tmp_path: Path, capsys) -> None:
    from training.cli import main as genrec

    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), tmp_path / "data")
    assert genrec(["new-items", "--config", "tiny", "--dataset", str(data_dir), "--models-dir", str(tmp_path / "models"),
                   "--set", "new_item_fraction=0.1", "train.epochs=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    figures = summary["new_items"]
    assert summary["split"] == "new-items" and figures["held_out_items"] == 6
    rows = figures["rows"]
    model = rows["this model (new items: tokenizer encode)"]
    assert model["all"]["users"] == model["new_target"]["users"] + model["known_target"]["users"]
    assert model["all"]["recall@10"] == summary["test"]["recall@10"]
    # The floors that only know training interactions never reach a held-out target.
    assert rows["most popular"]["new_target"]["recall@10"] == 0.0
    assert rows["last-item transitions"]["new_target"]["recall@10"] == 0.0
    # TIGER's cold-start placement beside the plain ranking, on the same users
    placed = rows["this model (new items: tokenizer encode, placed by shared prefix, share 0.1)"]
    assert placed["all"]["users"] == model["all"]["users"]
    assert summary["export_check"]["served_top10_equal"] == summary["export_check"]["users_checked"]


def test_genrec_eval_reports_the_long_tail_of_any_bundle(tiny_bundle: Path, capsys) -> None:
    """`genrec eval` on a served bundle: test figures by the target's training interactions, the
    buckets partitioning the test users."""
    from training.cli import main as genrec

    assert genrec(["eval", "--bundle", str(tiny_bundle), "--dataset", str(tiny_bundle.parents[2] / "data"),
                   "--providers", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    groups = out["test_by_popularity"]
    assert groups["all"]["recall@10"] == out["test"]["recall@10"]
    assert groups["tail<=5"]["users"] + groups["6-20"]["users"] + groups[">20"]["users"] == groups["all"]["users"]
    weighted = sum(groups[g]["recall@10"] * groups[g]["users"] for g in ("tail<=5", "6-20", ">20") if groups[g]["users"])
    assert abs(weighted / groups["all"]["users"] - groups["all"]["recall@10"]) < 1e-9
