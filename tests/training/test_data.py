from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    Dataset,
    DatasetFormatError,
    item_popularity,
    leave_one_out,
    load_dataset,
    make_synthetic_dataset,
    write_dataset,
)


@pytest.fixture(scope="module")
def beauty() -> Dataset:
    return load_dataset("beauty")


@pytest.fixture(scope="module")
def scientific() -> Dataset:
    return load_dataset("scientific")


def test_beauty_stats(beauty: Dataset) -> None:
    assert (beauty.n_users, beauty.n_items, beauty.n_interactions) == (22_363, 12_101, 198_502)
    assert beauty.item_ids[0] == "1" and beauty.item_ids[-1] == "12101"
    assert beauty.user_ids[0] == "1"
    # first user line is "1 1 2 3 4 5": item ids 1.. map to internal indices 0..
    np.testing.assert_array_equal(beauty.sequences[0], [0, 1, 2, 3, 4])
    assert all(s.dtype == np.int64 for s in beauty.sequences[:100])
    assert beauty.texts[0] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce. OPI, Makeup, Nails, Nail Polish"
    assert beauty.titles[0] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce"
    assert all(t.strip() for t in beauty.titles) and all(t.strip() for t in beauty.texts)
    # the 7 untitled items fall back to their attributes (no leading ". ")
    assert not any(t.startswith(".") for t in beauty.texts)


def test_scientific_stats(scientific: Dataset) -> None:
    assert (scientific.n_users, scientific.n_items, scientific.n_interactions) == (8_442, 4_385, 59_427)
    assert scientific.item_ids[0] == "0"
    np.testing.assert_array_equal(scientific.sequences[0][:3], [0, 1, 2])
    assert scientific.titles[0].startswith("eSUN Bronze filament") and ". " not in scientific.titles[0]
    assert scientific.texts[0].startswith(scientific.titles[0] + ". ")


def test_bundled_splits_sizes(beauty: Dataset) -> None:
    s = leave_one_out(beauty)
    assert len(s.train_sequences) == len(s.valid_histories) == len(s.test_histories) == beauty.n_users
    assert sum(len(t) for t in s.train_sequences) == beauty.n_interactions - 2 * beauty.n_users
    assert max(len(h) for h in s.test_histories) == 20
    pop = item_popularity(s.train_sequences, beauty.n_items)
    assert pop.shape == (beauty.n_items,) and pop.sum() == beauty.n_interactions - 2 * beauty.n_users


def _handmade() -> Dataset:
    return Dataset(
        name="hand",
        item_ids=["a", "b", "c", "d", "e"],
        titles=["A", "B", "C", "D", "E"],
        texts=["A", "B", "C", "D", "E"],
        user_ids=["u1", "u2"],
        sequences=[np.array([0, 1, 2], np.int64), np.array([4, 3, 2, 1, 0, 1], np.int64)],
    )


def test_leave_one_out_handmade() -> None:
    s = leave_one_out(_handmade(), max_history=3)
    np.testing.assert_array_equal(s.train_sequences[0], [0])
    np.testing.assert_array_equal(s.valid_histories[0], [0])
    np.testing.assert_array_equal(s.test_histories[0], [0, 1])
    np.testing.assert_array_equal(s.valid_targets, [1, 0])
    np.testing.assert_array_equal(s.test_targets, [2, 1])
    np.testing.assert_array_equal(s.train_sequences[1], [4, 3, 2, 1])
    np.testing.assert_array_equal(s.valid_histories[1], [3, 2, 1])  # items[:4][-3:]
    np.testing.assert_array_equal(s.test_histories[1], [2, 1, 0])  # items[:5][-3:]
    assert s.valid_targets.dtype == np.int64 and s.test_histories[1].dtype == np.int64
    np.testing.assert_array_equal(item_popularity(s.train_sequences, 5), [1, 1, 1, 1, 1])


def test_synthetic_round_trip(tmp_path: Path) -> None:
    ds = make_synthetic_dataset(n_users=50, n_items=40, seed=3)
    assert all(len(s) >= 3 for s in ds.sequences)
    for compress in (False, True):
        folder = write_dataset(ds, tmp_path / f"ds{compress}", compress=compress)
        back = load_dataset(str(folder))
        assert back.item_ids == ds.item_ids and back.titles == ds.titles and back.texts == ds.texts
        assert back.user_ids == ds.user_ids and back.attributes == ds.attributes
        assert all(np.array_equal(a, b) for a, b in zip(back.sequences, ds.sequences))
    # deterministic per seed, different across seeds
    again = make_synthetic_dataset(n_users=50, n_items=40, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again.sequences, ds.sequences))
    other = make_synthetic_dataset(n_users=50, n_items=40, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(other.sequences, ds.sequences))


def test_text_falls_back_to_title(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text('{"item_id": 7, "title": "seven"}\n{"item_id": "x", "title": "ex", "text": ""}\n'
                                          '{"item_id": "y", "title": "why", "text": "long why"}\n')
    (tmp_path / "sequences.txt").write_text("u 7 x y\n")
    ds = load_dataset(str(tmp_path))
    assert ds.item_ids == ["7", "x", "y"] and ds.texts == ["seven", "ex", "long why"]


def test_folder_attributes_are_read_as_lists(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text('{"item_id": "a", "title": "A", "attributes": {"brand": "Acme", "category": ["x", " "]}}\n'
                                          '{"item_id": "b", "title": "B"}\n{"item_id": "c", "title": "C"}\n')
    (tmp_path / "sequences.txt").write_text("u a b c\n")
    assert load_dataset(str(tmp_path)).attributes == [{"brand": ["Acme"], "category": ["x"]}, {}, {}]
    (tmp_path / "items.jsonl").write_text('{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "B"}\n'
                                          '{"item_id": "c", "title": "C"}\n')
    assert load_dataset(str(tmp_path)).attributes is None


def test_bundled_attributes_map_to_brand_and_category(beauty: Dataset, scientific: Dataset) -> None:
    # Beauty item 1: ["OPI", "Makeup", "Nails", "Nail Polish"]; item 3's brand is "Unknown"
    assert beauty.attributes[0] == {"brand": ["OPI"], "category": ["Makeup", "Nails", "Nail Polish"]}
    assert beauty.attributes[2] == {"category": ["Skin Care", "Face", "Creams & Moisturizers"]}
    assert sum("brand" in row for row in beauty.attributes) > 7000
    assert all(row["category"][0] in {"Skin Care", "Hair Care", "Makeup", "Tools & Accessories", "Bath & Body",
                                      "Fragrance"} for row in beauty.attributes if "category" in row)
    assert scientific.attributes[0] == {"brand": ["eSUN"]}  # "... 3D Printing Filament. eSUN."


GOOD_ITEMS = ['{"item_id": "a", "title": "A", "text": "a"}', '{"item_id": "b", "title": "B", "text": "b"}',
              '{"item_id": 3, "title": "C", "text": "c"}']
GOOD_SEQS = ["u1 a b 3", "u2 b 3 a b"]


@pytest.mark.parametrize(
    ("items", "seqs", "bad_file", "line", "reason"),
    [
        (GOOD_ITEMS[:1] + ["{not json"] + GOOD_ITEMS[2:], GOOD_SEQS, "items.jsonl", 2, "invalid JSON"),
        (GOOD_ITEMS[:2] + ['["a list"]'], GOOD_SEQS, "items.jsonl", 3, "expected a JSON object"),
        (GOOD_ITEMS[:2] + ['{"title": "C", "text": "c"}'], GOOD_SEQS, "items.jsonl", 3, "missing field 'item_id'"),
        (GOOD_ITEMS[:2] + ['{"item_id": 3, "text": "c"}'], GOOD_SEQS, "items.jsonl", 3, "missing field 'title'"),
        (GOOD_ITEMS[:2] + ['{"item_id": 1.5, "title": "C"}'], GOOD_SEQS, "items.jsonl", 3, "item_id must be"),
        (GOOD_ITEMS[:2] + ['{"item_id": "a", "title": "C"}'], GOOD_SEQS, "items.jsonl", 3, "duplicate item_id"),
        (GOOD_ITEMS[:2] + ['{"item_id": 3, "title": 5}'], GOOD_SEQS, "items.jsonl", 3, "must be a string"),
        ([], GOOD_SEQS, "items.jsonl", 0, "empty file"),
        (GOOD_ITEMS, ["u1 a b 3", "u2 a zz b"], "sequences.txt", 2, "unknown item id 'zz'"),
        (GOOD_ITEMS, ["u1 a b 3", "", "u2 a b"], "sequences.txt", 3, "has 2 items"),
        (GOOD_ITEMS, ["u1 a b 3", "u1 a b 3"], "sequences.txt", 2, "duplicate user id"),
        (GOOD_ITEMS, [], "sequences.txt", 0, "empty file"),
        (GOOD_ITEMS[:2] + ['{"item_id": 3, "title": "C", "attributes": ["x"]}'], GOOD_SEQS, "items.jsonl", 3,
         "field 'attributes' must be an object"),
        (GOOD_ITEMS[:2] + ['{"item_id": 3, "title": "C", "attributes": {"brand": 5}}'], GOOD_SEQS, "items.jsonl", 3,
         "attribute 'brand' must be a string or a list of strings"),
    ],
)
def test_malformed_genrec(tmp_path: Path, items: list[str], seqs: list[str], bad_file: str, line: int, reason: str) -> None:
    (tmp_path / "items.jsonl").write_text("".join(f"{r}\n" for r in items))
    (tmp_path / "sequences.txt").write_text("".join(f"{r}\n" for r in seqs))
    with pytest.raises(DatasetFormatError) as ei:
        load_dataset(str(tmp_path))
    err = ei.value
    assert Path(err.file).name == bad_file
    assert err.line == line
    assert reason in err.reason
    assert bad_file in str(err) and (f":{line}:" in str(err) if line else True)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(DatasetFormatError, match="missing items.jsonl"):
        load_dataset(str(tmp_path))
    (tmp_path / "items.jsonl").write_text(GOOD_ITEMS[0] + "\n")
    with pytest.raises(DatasetFormatError, match="missing sequences"):
        load_dataset(str(tmp_path))


def _write_beauty_like(folder: Path, item_lines: list[dict], seq_lines: list[str]) -> None:
    folder.mkdir()
    with gzip.open(folder / "items.jsonl.gz", "wt") as f:
        for obj in item_lines:
            f.write(json.dumps(obj) + "\n")
    (folder / "sequential_data.txt").write_text("".join(f"{s}\n" for s in seq_lines))


def test_beauty_adapter_errors(tmp_path: Path) -> None:
    from training.data import read_beauty

    items = [{"item_id": i, "title": f"t{i}", "attributes": ["x"]} for i in (1, 2, 3)]
    _write_beauty_like(tmp_path / "ok", items, ["1 1 2 3"])
    ds = read_beauty(tmp_path / "ok")
    assert ds.texts[0] == "t1. x" and ds.n_interactions == 3

    _write_beauty_like(tmp_path / "nonint", items, ["1 1 2 3", "2 1 two 3"])
    with pytest.raises(DatasetFormatError, match=r"sequential_data.txt:2: item id 'two' is not an integer"):
        read_beauty(tmp_path / "nonint")

    bad_items = items[:2] + [{"item_id": "3", "title": "t3", "attributes": []}]
    _write_beauty_like(tmp_path / "strid", bad_items, ["1 1 2 3"])
    with pytest.raises(DatasetFormatError, match=r"items.jsonl.gz:3: item_id must be an integer"):
        read_beauty(tmp_path / "strid")

    _write_beauty_like(tmp_path / "unknown", items, ["1 1 2 4"])
    with pytest.raises(DatasetFormatError, match=r"sequential_data.txt:1: unknown item id '4'"):
        read_beauty(tmp_path / "unknown")
