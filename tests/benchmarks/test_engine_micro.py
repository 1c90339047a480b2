"""The engine micro-benchmarks: which synthetic catalogs a model's whole search can run over, and a
clear stop when CUDA is asked of an onnxruntime without it."""
from __future__ import annotations

import engine_micro
import pytest

from service.bundle import Manifest, load_bundle


def manifest_with_model(model: dict) -> Manifest:
    return Manifest(name="m", version="1", max_history=20, beam_size=20, files={}, model=model)


@pytest.mark.parametrize(("options", "limit"), [
    ({}, None),
    ({"history_item_ids": True}, 12101),
    ({"item_head": True}, 12101),
    ({"history_item_ids": True, "item_head": True}, 12101),
])
def test_models_that_embed_item_ids_are_limited_to_their_item_table(options, limit):
    config = {"item_count": 12101, "history_item_ids": False, "item_head": False} | options
    assert engine_micro.own_item_table_size(manifest_with_model({"kind": "seq2seq", "config": config})) == limit


def test_a_manifest_without_model_config_has_no_limit():
    assert engine_micro.own_item_table_size(manifest_with_model({"kind": "seq2seq"})) is None


def test_asking_for_cuda_without_a_cuda_onnxruntime_stops_with_what_to_install(tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the benchmark would run on it")  # a GPU box, not CI
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(SystemExit, match=r"CUDAExecutionProvider.* is available.*install the gpu extra \(onnxruntime-gpu\)"):
        engine_micro.engine_alone(bundle, [], "cuda", threads=1, quick=True)
