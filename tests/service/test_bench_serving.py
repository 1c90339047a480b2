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


def _setting(p99: float, share: float | None, rps: float, one_round: float = 1.0) -> dict:
    return {"p99_ms_at_70pct": p99, "outside_share_at_peak": share, "rps_at_70pct": rps, "one_round_fraction": one_round}


def test_the_sweep_chooses_the_widest_margin_among_settings_meeting_both_targets(bench_serving):
    rows = [_setting(49.0, 0.20, 700.0), _setting(30.0, 0.15, 500.0), _setting(20.0, 0.40, 900.0)]
    assert bench_serving.rank_settings(rows)[0] is rows[1]
    # The lowest p99 loses to a knee with more room: 0.92 of the best at one round is 0.2 of the way
    # from slipping, against a p99 margin of 0.4 and a share margin of 0.4 for the other.
    knees = [_setting(15.0, 0.15, 700.0, one_round=0.92), _setting(30.0, 0.15, 900.0, one_round=0.97)]
    assert bench_serving.rank_settings(knees)[0] is knees[1]
    # and a tight share loses too
    shares = [_setting(20.0, 0.24, 700.0), _setting(35.0, 0.15, 900.0)]
    assert bench_serving.rank_settings(shares)[0] is shares[1]


def test_without_both_targets_met_the_sweep_takes_p99_first_then_the_lowest_p99(bench_serving):
    p99_only = [_setting(45.0, 0.50, 700.0), _setting(40.0, 0.30, 500.0), _setting(80.0, 0.10, 900.0)]
    assert bench_serving.rank_settings(p99_only) == [p99_only[1], p99_only[0], p99_only[2]]
    neither = [_setting(70.0, 0.10, 900.0), _setting(60.0, None, 500.0)]
    assert bench_serving.rank_settings(neither)[0] is neither[1]


def test_finalists_are_the_settings_meeting_both_targets_with_the_most_peak(bench_serving):
    def row(peak: float, p99: float, share: float) -> dict:
        return _setting(p99, share, 0.7 * peak) | {"peak_rps": peak}

    low, middle, high, fails_p99, fails_share = (row(345.0, 26.5, 0.13), row(576.0, 47.0, 0.15), row(683.0, 40.0, 0.16),
                                                 row(770.0, 123.0, 0.35), row(428.0, 48.0, 0.50))
    rows = [low, middle, high, fails_p99, fails_share]
    assert bench_serving.pick_finalists(rows) == [high, middle, low]
    # fewer than three meet both: the rest come in rank_settings' order (p99 met, lowest share first)
    assert bench_serving.pick_finalists([fails_p99, high, fails_share]) == [high, fails_share, fails_p99]
    # judged by their worst measurements: the most peak among those still meeting both
    assert bench_serving.choose_finalist([low, middle, high]) is high
    assert bench_serving.choose_finalist([low, row(683.0, 55.0, 0.16)]) is low
    assert bench_serving.choose_finalist([fails_p99, fails_share]) is fails_share


def _measurement(rps: float, share: float | None, one_round: float, p99: float) -> dict:
    return {"peak": {"achieved_rps": rps, "p99_ms": 20.0, "outside_share_service": share, "one_round_fraction": one_round},
            "window": {"achieved_rps": 0.7 * rps, "p50_ms": 15.0, "p99_ms": p99, "mean_batch": 3.0}}


def test_a_setting_is_judged_by_its_worst_measurement(bench_serving):
    setting = {"engine_workers": 2, "max_batch_size": 8, "max_wait_ms": 2.0, "busy_intra_op_threads": 1}
    row = bench_serving.setting_row(setting, [_measurement(700.0, 0.15, 0.95, 40.0), _measurement(650.0, 0.30, 0.88, 35.0)])
    assert (row["peak_rps"], row["outside_share_at_peak"], row["one_round_fraction"], row["p99_ms_at_70pct"]) == (
        650.0, 0.30, 0.88, 40.0)
    assert row["p99_ms_at_70pct_windows"] == [40.0, 35.0]
    assert bench_serving.key(row) == (2, 8, 2.0, 1)
    # one peak without a share (no engine time measured) leaves the worst share unknown
    assert bench_serving.setting_row(setting, [_measurement(700.0, None, 0.95, 40.0)])["outside_share_at_peak"] is None


def test_asking_for_cuda_without_a_cuda_onnxruntime_stops_with_what_to_install(bench_serving, tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the benchmark would run on it")  # a GPU box, not CI
    bundle = bench_serving.load_bundle(tiny_bundle)
    with pytest.raises(SystemExit, match=r"CUDAExecutionProvider.* is available.*install the gpu extra \(onnxruntime-gpu\)"):
        bench_serving.engine_alone(bundle, [], "cuda", threads=1, quick=True)
