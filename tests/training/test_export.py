"""`genrec export --bundle`: graphs rebuilt from the bundle's weights serve the same answers."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from service.bundle import load_bundle
from service.engine import OnnxBeamEngine
from training.cli import main as genrec


def test_export_rebuilds_graphs_in_place_with_fresh_digests(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    before = OnnxBeamEngine(load_bundle(copy), providers="cpu")
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, before._tensorize.pad_index, size=n) for n in (1, 3, 7, 12)]
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
