"""Per-request constraints (include, exclude, attribute filters): the restricted trie, the graph
against the reference search under a restriction, and POST /recommend's answers and warnings."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import Bundle, load_bundle, sha256_file
from service.constraints import (AttributeIndex, Constraint, RestrictionCache, UnknownAttribute, allowed_items,
                                 allowed_prefixes, resolve_constraint, restricted_trie)
from service.engine import OnnxBeamEngine
from service.reference import ReferenceBeamEngine
from service.trie import PrefixTrie
from tests.service.test_api import make_settings


def attribute_index(bundle: Bundle) -> AttributeIndex:
    return AttributeIndex.from_rows(bundle.attributes, bundle.num_items)


# ---- the mask and the restricted trie ----------------------------------------------------------

def test_allowed_items_combine_filters_include_exclude_and_active_items() -> None:
    rows = [{"brand": ["a"], "category": ["x", "y"]}, {"brand": ["b"], "category": ["y"]}, {"brand": ["a"]}, {}]
    index = AttributeIndex.from_rows(rows, 4)
    assert index.names == ["brand", "category"]
    by_filter = Constraint(filters=(("category", ("y",)),))
    assert allowed_items(by_filter, index).tolist() == [True, True, False, False]
    either = Constraint(filters=(("brand", ("a", "b")), ("category", ("x",))))  # any value of each, every attribute
    assert allowed_items(either, index).tolist() == [True, False, False, False]
    include_exclude = Constraint(include=(0, 2, 3), exclude=(3,))
    assert allowed_items(include_exclude, index).tolist() == [True, False, True, False]
    inactive = np.array([False, True, True, True])
    assert allowed_items(Constraint(filters=(("brand", ("a",)),)), index, inactive).tolist() == [False, False, True, False]


def test_restricted_trie_holds_exactly_the_allowed_items_and_their_prefixes() -> None:
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 4, size=(300, 3)), axis=0)
    codes = np.concatenate([codes, np.arange(len(codes))[:, None] % 2], axis=1)  # a collision level
    for trial in range(20):
        allowed = rng.random(len(codes)) < rng.choice([0.02, 0.3, 0.9])
        if not allowed.any():
            continue
        trie = restricted_trie(codes, allowed)
        assert sorted(trie.leaf_items.tolist()) == np.flatnonzero(allowed).tolist()
        # Walking the arrays from the root visits exactly the prefixes with an allowed leaf under them.
        prefixes = allowed_prefixes(codes, allowed)
        reference = PrefixTrie(codes)
        nodes = {(): 0}
        for depth in range(codes.shape[1]):
            next_nodes = {}
            for prefix, node in nodes.items():
                children = [int(c) for c in trie.codes[depth][node] if c >= 0]
                assert children == [c for c in reference.children(prefix) if prefix + (c,) in prefixes]
                for slot, code in enumerate(children):
                    next_nodes[prefix + (code,)] = int(trie.offsets[depth][node]) + slot
            nodes = next_nodes
        assert {reference.item_at(prefix) for prefix in nodes} == set(np.flatnonzero(allowed).tolist())
        assert all(int(trie.leaf_items[leaf]) == reference.item_at(prefix) for prefix, leaf in nodes.items())


def test_unknown_attribute_is_refused_with_the_known_ones_and_unknown_ids_are_warned() -> None:
    index = AttributeIndex.from_rows([{"brand": ["a"]}], 1)
    lookup = lambda ids: ([0 for i in ids if i == "i0"], [i for i in ids if i != "i0"])  # noqa: E731
    with pytest.raises(UnknownAttribute, match="'brand'"):
        resolve_constraint(None, None, {"colour": "red"}, lookup, index)
    constraint, warnings = resolve_constraint(["i0", "gone"], ["nope"], {"brand": "a"}, lookup, index)
    assert constraint == Constraint(include=(0,), exclude=(), filters=(("brand", ("a",)),))
    assert any("gone" in w for w in warnings) and any("nope" in w for w in warnings)
    assert resolve_constraint(None, [], {}, lookup, index) == (None, [])


def test_the_graph_searches_the_restricted_trie_as_the_reference_search_does(demo_bundle: Bundle) -> None:
    """Same items and scores from beam_search.onnx on the restricted trie as from the plain search that
    follows only allowed prefixes: the constraint is a mask over leaves and prefixes inside the search."""
    graph = OnnxBeamEngine(demo_bundle, providers="cpu")
    bound = OnnxBeamEngine(demo_bundle, providers="cpu", use_io_binding=True)  # the GPU's feeding path, on CPU
    reference = ReferenceBeamEngine(demo_bundle, providers="cpu")
    cache = RestrictionCache(demo_bundle.semantic_ids, attribute_index(demo_bundle), demo_bundle.popularity)
    category = demo_bundle.attributes[0]["category"][0]
    histories = [np.asarray(demo_bundle.popularity[i : i + 4], dtype=np.int64) for i in (0, 7, 20)]
    for constraint in (Constraint(filters=(("category", (category,)),)),
                       Constraint(exclude=tuple(int(i) for i in demo_bundle.popularity[:30])),
                       Constraint(include=(1, 2, 3, 5, 8, 13, 21, 34))):
        restriction = cache.get(constraint)
        items, scores = graph.search(histories, restriction=restriction)
        expected_items, expected_scores = reference.search(histories, restriction=restriction)
        found = items >= 0
        assert np.array_equal(items, expected_items)
        np.testing.assert_allclose(scores[found], expected_scores[found], atol=1e-4)
        assert np.array_equal(bound.search(histories, restriction=restriction)[0], items)
        assert restriction.allowed[items[found]].all()
        assert found.sum(axis=1).tolist() == [min(restriction.count, graph.beam_size)] * len(histories)


# ---- POST /recommend -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(demo_bundle_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(demo_bundle_dir))) as test_client:
        yield test_client


def matching(bundle: Bundle, name: str, value: str) -> set[str]:
    return {bundle.item_ids[i] for i, row in enumerate(bundle.attributes) if value in row.get(name, [])}


def test_a_filter_returns_only_matching_items_from_the_beam(client: TestClient, demo_bundle: Bundle) -> None:
    history = [demo_bundle.item_ids[i] for i in (0, 1, 2)]
    unconstrained = client.post("/recommend", json={"history": history, "k": 5}).json()["items"]
    top = {item["item_id"] for item in unconstrained}
    # A category none of the unconstrained top 5 has: dropping non-matching items from an over-fetched
    # list would leave nothing; searching the matching items' trie still gives k, all scored by the model.
    categories = {v for row in demo_bundle.attributes for v in row["category"]}
    category = next(c for c in sorted(categories)
                    if not matching(demo_bundle, "category", c) & top
                    and len(matching(demo_bundle, "category", c) - set(history)) >= 5)
    answer = client.post("/recommend", json={"history": history, "k": 5, "filters": {"category": category}}).json()
    assert len(answer["items"]) == 5 and answer["strategy"] == "generative" and answer["warnings"] == []
    assert {item["item_id"] for item in answer["items"]} <= matching(demo_bundle, "category", category)
    assert all(item["score"] is not None for item in answer["items"])  # from the search, not a popularity fill


def test_k_matching_items_come_back_whenever_k_exist_beyond_the_beam(client: TestClient, demo_bundle: Bundle) -> None:
    beam = demo_bundle.beam_size
    include = demo_bundle.item_ids[5 : 5 + beam + 10]
    history = demo_bundle.item_ids[:3]
    answer = client.post("/recommend", json={"history": history, "k": beam + 5, "include": include,
                                             "exclude": include[:3]}).json()
    ids = [item["item_id"] for item in answer["items"]]
    assert len(ids) == beam + 5 == len(set(ids))
    assert set(ids) <= set(include[3:])
    # beyond the beam the rest are the most popular matching items, and the answer says so
    assert any("popularity ranking of the matching items" in w for w in answer["warnings"])


def test_fewer_matching_items_than_k_returns_all_of_them_with_a_warning(client: TestClient, demo_bundle: Bundle) -> None:
    include = demo_bundle.item_ids[10:13]
    answer = client.post("/recommend", json={"history": demo_bundle.item_ids[:3], "k": 10, "include": include}).json()
    assert sorted(item["item_id"] for item in answer["items"]) == sorted(include)
    assert any("only 3 item(s) match the constraints" in w for w in answer["warnings"])


def test_no_history_gives_the_popular_matching_items_and_says_so(client: TestClient, demo_bundle: Bundle) -> None:
    brand = demo_bundle.attributes[3]["brand"][0]
    answer = client.post("/recommend", json={"k": 4, "filters": {"brand": [brand]}}).json()
    expected = [demo_bundle.item_ids[i] for i in demo_bundle.popularity if brand in demo_bundle.attributes[i]["brand"]][:4]
    assert [item["item_id"] for item in answer["items"]] == expected
    assert answer["strategy"] == "popular"
    assert any("most popular matching items" in w for w in answer["warnings"])


def test_an_empty_match_answers_no_items_and_says_none_match(client: TestClient, demo_bundle: Bundle) -> None:
    answer = client.post("/recommend", json={"history": demo_bundle.item_ids[:3],
                                             "filters": {"category": "no-such-category"}})
    assert answer.status_code == 200
    assert answer.json()["items"] == []
    assert any("no item matches the constraints" in w for w in answer.json()["warnings"])


def test_an_unknown_attribute_is_422_listing_the_known_ones(client: TestClient, demo_bundle: Bundle) -> None:
    response = client.post("/recommend", json={"history": demo_bundle.item_ids[:2], "filters": {"colour": "red"}})
    assert response.status_code == 422
    assert "'brand', 'category', 'style'" in response.json()["detail"]
    assert client.get("/info").json()["attributes"] == ["brand", "category", "style"]


def test_a_bundle_without_attributes_still_loads_and_refuses_filters(demo_bundle_dir: Path, tmp_path: Path) -> None:
    old = Path(shutil.copytree(demo_bundle_dir, tmp_path / "old"))
    rows = [json.loads(line) for line in (old / "items.jsonl").read_text().splitlines()]
    (old / "items.jsonl").write_text("".join(json.dumps({"item_id": r["item_id"], "title": r["title"]}) + "\n" for r in rows))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"]["items.jsonl"] = sha256_file(old / "items.jsonl")
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(old).attributes == [{}] * len(rows)
    with TestClient(create_app(make_settings(old))) as client:
        assert client.get("/info").json()["attributes"] == []
        refused = client.post("/recommend", json={"history": [rows[0]["item_id"]], "filters": {"brand": "x"}})
        assert refused.status_code == 422 and "no item attributes" in refused.json()["detail"]
        included = client.post("/recommend", json={"history": [rows[0]["item_id"]], "k": 2,
                                                   "include": [rows[5]["item_id"], rows[6]["item_id"]]}).json()
        assert {item["item_id"] for item in included["items"]} == {rows[5]["item_id"], rows[6]["item_id"]}


def test_the_restriction_cache_reuses_equal_constraints_and_stays_bounded() -> None:
    rows = [{"brand": [f"b{i % 7}"]} for i in range(100)]
    codes = np.stack([np.arange(100) // 10, np.arange(100) % 10], axis=1)
    cache = RestrictionCache(codes, AttributeIndex.from_rows(rows, 100), np.arange(100)[::-1], max_entries=4)
    first = cache.get(Constraint(filters=(("brand", ("b1",)),)))
    assert cache.get(Constraint(filters=(("brand", ("b1",)),))) is first  # one mask and trie per constraint
    assert first.popular.tolist() == [i for i in range(99, -1, -1) if i % 7 == 1]
    for n in range(10):
        cache.get(Constraint(exclude=(n,)))
    assert len(cache) == 4 and cache.get(Constraint(filters=(("brand", ("b1",)),))) is not first
    small = RestrictionCache(codes, AttributeIndex.from_rows(rows, 100), np.arange(100), max_bytes=1)
    for n in range(3):
        small.get(Constraint(exclude=(n,)))
    assert len(small) == 1  # over the byte bound only the newest stays
