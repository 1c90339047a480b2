"""Transition fusion: the served ranking fuses the beam with the newest history item's successors
(service/fusion.py); training evaluates with the same code, and the route serves exactly that."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import BundleError, Manifest, file_digests, load_bundle
from service.engine import OnnxBeamEngine
from service.fusion import (OFFSETS_FILE, RANK_OFFSET, SUCCESSORS_FILE, TransitionFusion, fuse_ranked, fuse_rankings,
                            save_fusion)
from tests.service.test_api import make_settings


def test_reciprocal_rank_fusion_of_the_beam_and_the_successors() -> None:
    items, scores = fuse_ranked(np.array([5, 3, -1, 7, 5]), np.array([3, 9]), weight=1.0)
    # 3 is second in the beam and first among the successors; 9 only a successor; the repeated 5 counts once
    assert items.tolist() == [3, 5, 9, 7]
    np.testing.assert_allclose(scores, [1 / (RANK_OFFSET + 1) + 1 / RANK_OFFSET, 1 / RANK_OFFSET,
                                        1 / (RANK_OFFSET + 1), 1 / (RANK_OFFSET + 2)])
    # a small weight leaves the beam's order first; ties keep the beam's order
    assert fuse_ranked(np.array([1, 2]), np.array([4]), weight=0.01)[0].tolist() == [1, 2, 4]
    assert fuse_ranked(np.array([1, 2]), np.array([2, 1]), weight=1.0)[0].tolist() == [1, 2]


def test_successors_follow_the_table_and_the_constraint() -> None:
    fusion = TransitionFusion(np.array([0, 2, 2, 3]), np.array([1, 2, 0]), weight=1.0)
    assert fusion.successors_of(0).tolist() == [1, 2] and fusion.successors_of(1).size == 0
    assert fusion.successors_of(7).size == 0  # an item added after training has none
    allowed = np.array([True, False, True])
    assert fusion.fuse(np.array([0]), 0, allowed)[0].tolist() == [0, 2]  # successor 1 is not allowed
    rankings = fuse_rankings(np.array([[0, -1], [2, 0]]), np.array([0, 1]), fusion, k=3)
    assert rankings.tolist() == [[0, 1, 2], [2, 0, -1]]


@pytest.mark.parametrize("offsets, successors, weight, message", [
    ([0, 2, 3], [1, 0], 1.0, "end at 3"),
    ([0, 2, 1], [1, 0], 1.0, "never decrease"),
    ([0, 1, 2], [1, 5], 1.0, "item indices"),
    ([0, 1, 2], [1, 0], 0.0, "positive"),
])
def test_an_inconsistent_table_is_refused(offsets, successors, weight, message) -> None:
    with pytest.raises(ValueError, match=message):
        TransitionFusion(np.array(offsets), np.array(successors), weight)


def with_fusion(bundle_dir: Path, offsets: np.ndarray, successors: np.ndarray, weight: float) -> Path:
    """The bundle with successor lists and manifest.fusion added, digests rewritten."""
    spec = save_fusion(bundle_dir, TransitionFusion(offsets, successors, weight))
    manifest = load_bundle(bundle_dir, verify_checksums=False).manifest
    files = [*manifest.files, OFFSETS_FILE, SUCCESSORS_FILE]
    replace(manifest, fusion=spec, files=file_digests(bundle_dir, sorted(set(files)))).write(bundle_dir)
    return bundle_dir


def random_successors(n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, n_items)
    return np.concatenate([[0], np.cumsum(counts)]), rng.integers(0, n_items, int(counts.sum()))


def test_the_service_serves_the_fused_ranking(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    offsets, successors = random_successors(bundle.num_items)
    with_fusion(bundle_copy, offsets, successors, weight=1.0)
    fused_bundle = load_bundle(bundle_copy)
    assert fused_bundle.fusion is not None and fused_bundle.fusion.weight == 1.0
    engine = OnnxBeamEngine(fused_bundle, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    with TestClient(create_app(make_settings(bundle_copy))) as client:
        for _ in range(5):
            history = rng.choice(bundle.num_items, 4, replace=False)
            beam, _ = engine.search([history])
            expected, _ = fused_bundle.fusion.fuse(beam[0], int(history[-1]))
            expected = [int(i) for i in expected if i not in set(history.tolist())][:10]
            answer = client.post("/recommend", json={"history": [bundle.item_ids[i] for i in history], "k": 10})
            assert answer.status_code == 200, answer.text
            served = [item["item_id"] for item in answer.json()["items"]][: len(expected)]
            assert served == [bundle.item_ids[i] for i in expected]


def test_a_bundle_whose_table_does_not_fit_its_catalog_is_refused(bundle_copy: Path) -> None:
    n_items = load_bundle(bundle_copy).num_items
    offsets, successors = random_successors(n_items - 1)
    with_fusion(bundle_copy, offsets, successors, weight=0.5)
    with pytest.raises(BundleError, match="offsets for"):
        load_bundle(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["fusion"] = {"kind": "co-views", "weight": 1.0}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="fusion kind 'co-views' is unknown"):
        load_bundle(bundle_copy, verify_checksums=False)
    assert Manifest.from_dict({**manifest, "fusion": {}}).fusion == {}
