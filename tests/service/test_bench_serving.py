"""The serving benchmark's rule for which synthetic catalogs a model's whole search can run over."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serving.py"


@pytest.fixture(scope="module")
def bench_serving():
    spec = importlib.util.spec_from_file_location("bench_serving", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("options", "limit"), [
    ({}, None),
    ({"history_item_ids": True}, 12101),
    ({"item_head": True}, 12101),
    ({"history_item_ids": True, "item_head": True}, 12101),
])
def test_models_that_embed_item_ids_are_limited_to_their_item_table(bench_serving, options, limit):
    manifest = {"model": {"kind": "seq2seq", "config": {"item_count": 12101, "history_item_ids": False,
                                                        "item_head": False} | options}}
    assert bench_serving.own_item_table_size(manifest) == limit


def test_a_manifest_without_model_config_has_no_limit(bench_serving):
    assert bench_serving.own_item_table_size({}) is None
