from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.bundle import Bundle, BundleError
from service.engine import CPU, HistoryTensorizer, OnnxBeamEngine, check_graph_inputs, resolve_providers
from service.reference import ReferenceBeamEngine

SCORE_TOLERANCE = 1e-4


def assert_same_results(fast: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> None:
    fast_items, fast_scores = fast
    ref_items, ref_scores = reference
    assert fast_items.shape == ref_items.shape
    np.testing.assert_array_equal(fast_items, ref_items)
    valid = ref_items >= 0
    np.testing.assert_array_equal(fast_items >= 0, valid)
    np.testing.assert_allclose(fast_scores[valid], ref_scores[valid], atol=SCORE_TOLERANCE, rtol=0)


def random_histories(rng: np.random.Generator, num_items: int, batch: int, max_len: int) -> list[np.ndarray]:
    return [rng.integers(0, num_items, size=rng.integers(1, max_len + 1)) for _ in range(batch)]


def test_tensorizer_left_pads_to_max_history() -> None:
    semantic_ids = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32)
    feeds = HistoryTensorizer(semantic_ids, max_history=3)([np.array([2, 0]), np.array([0, 1, 2, 1])])
    codes, mask, items = feeds["history_codes"], feeds["history_mask"], feeds["history_items"]
    assert codes.dtype == np.int64 and mask.dtype == np.bool_ and items.dtype == np.int64
    assert items.tolist() == [[3, 2, 0], [1, 2, 1]]  # padding is the catalog size, the embeddings' padding row
    assert codes.shape == (2, 3, 2) and mask.shape == (2, 3)
    assert mask.tolist() == [[False, True, True], [True, True, True]]
    assert codes[0].tolist() == [[0, 0], [5, 6], [1, 2]]  # padding left, most recent last
    assert codes[1].tolist() == [[3, 4], [5, 6], [3, 4]]  # only the 3 most recent
    with pytest.raises(ValueError, match="out of range"):
        HistoryTensorizer(semantic_ids, 3)([np.array([3])])


def test_graph_and_reference_agree_on_the_demo_catalog(demo_bundle: Bundle) -> None:
    fast = OnnxBeamEngine(demo_bundle, providers="cpu")
    reference = ReferenceBeamEngine(demo_bundle, providers="cpu")
    rng = np.random.default_rng(0)
    histories = random_histories(rng, demo_bundle.num_items, batch=16, max_len=30)  # some longer than max_history
    fast_result, reference_result = fast.search(histories), reference.search(histories)
    assert_same_results(fast_result, reference_result)
    assert fast_result[0].shape == (16, demo_bundle.beam_size)
    # every row is a full beam of distinct real items, best first
    for items, scores in zip(*fast_result):
        assert (items >= 0).all() and len(set(items.tolist())) == len(items)
        assert (np.diff(scores) <= 1e-6).all()


def test_a_request_does_not_depend_on_its_batch(demo_bundle: Bundle) -> None:
    engine = OnnxBeamEngine(demo_bundle, providers="cpu")
    rng = np.random.default_rng(1)
    histories = random_histories(rng, demo_bundle.num_items, batch=8, max_len=20)
    items_batched, scores_batched = engine.search(histories)
    for i, history in enumerate(histories):
        items_alone, scores_alone = engine.search([history])
        np.testing.assert_array_equal(items_alone[0], items_batched[i])
        np.testing.assert_allclose(scores_alone[0], scores_batched[i], atol=1e-5)


def test_io_binding_path_matches_plain_feeds(demo_bundle: Bundle) -> None:
    plain = OnnxBeamEngine(demo_bundle, providers="cpu", use_io_binding=False)
    bound = OnnxBeamEngine(demo_bundle, providers="cpu", use_io_binding=True)
    assert bound.uses_io_binding and not plain.uses_io_binding
    histories = random_histories(np.random.default_rng(2), demo_bundle.num_items, batch=5, max_len=20)
    assert_same_results(bound.search(histories), plain.search(histories))


def test_a_call_starting_while_another_computes_runs_on_the_busy_session(demo_bundle: Bundle) -> None:
    engine = OnnxBeamEngine(demo_bundle, providers="cpu", intra_op_threads=2, busy_intra_op_threads=1)
    assert engine.busy_session is not engine.session
    assert engine.busy_session.get_session_options().intra_op_num_threads == 1
    histories = random_histories(np.random.default_rng(3), demo_bundle.num_items, batch=4, max_len=20)
    calls: list[str] = []
    answers: list[tuple[np.ndarray, np.ndarray]] = []
    lone_run, busy_run = engine.session.run, engine.busy_session.run

    def run_alone(*args, **kwargs):
        calls.append("alone")
        if len(calls) == 1:  # while this call computes, another one starts
            answers.append(engine.search(histories))
        return lone_run(*args, **kwargs)

    def run_busy(*args, **kwargs):
        calls.append("busy")
        return busy_run(*args, **kwargs)

    engine.session.run, engine.busy_session.run = run_alone, run_busy
    answers.append(engine.search(histories))
    answers.append(engine.search(histories))  # alone again once the others finished
    assert calls == ["alone", "busy", "alone"]
    assert_same_results(answers[0], answers[1])


def test_one_session_when_the_busy_threads_are_the_same(demo_bundle: Bundle) -> None:
    for busy in (None, 1):
        engine = OnnxBeamEngine(demo_bundle, providers="cpu", intra_op_threads=1, busy_intra_op_threads=busy)
        assert engine.busy_session is engine.session


def subset_catalog(bundle: Bundle, keep: np.ndarray) -> Bundle:
    """The same model over a smaller catalog: the trie is a graph input, so no re-export is needed."""
    return dataclasses.replace(
        bundle,
        semantic_ids=bundle.semantic_ids[keep],
        item_ids=[bundle.item_ids[i] for i in keep],
        titles=[bundle.titles[i] for i in keep],
        popularity=np.arange(len(keep), dtype=np.int64),
        index_of={bundle.item_ids[i]: j for j, i in enumerate(keep)},
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_graph_and_reference_agree_on_random_catalogs(demo_bundle: Bundle, data: st.DataObject) -> None:
    size = data.draw(st.integers(1, demo_bundle.num_items), label="catalog size")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    catalog = subset_catalog(demo_bundle, np.sort(rng.choice(demo_bundle.num_items, size=size, replace=False)))
    histories = random_histories(rng, size, batch=data.draw(st.integers(1, 4), label="batch"), max_len=25)
    fast = OnnxBeamEngine(catalog, providers="cpu").search(histories)
    reference = ReferenceBeamEngine(catalog, providers="cpu").search(histories)
    assert_same_results(fast, reference)
    expected_valid = min(size, demo_bundle.beam_size)
    assert ((fast[0] >= 0).sum(axis=1) == expected_valid).all()  # -1 only where the catalog runs out


def test_providers_resolve_to_what_onnxruntime_has() -> None:
    assert resolve_providers("cpu") == [CPU]
    assert resolve_providers("auto")[-1] == CPU
    with pytest.raises(ValueError, match="none of the execution providers"):
        resolve_providers("NoSuchExecutionProvider")


def test_engine_reports_the_provider_it_runs_on(demo_bundle: Bundle) -> None:
    engine = OnnxBeamEngine(demo_bundle, providers="cpu")
    assert engine.provider == CPU == engine.session.get_providers()[0]
    assert ReferenceBeamEngine(demo_bundle, providers="cpu").provider == CPU


def test_graph_inputs_are_checked_against_the_contract(demo_bundle: Bundle) -> None:
    engine = OnnxBeamEngine(demo_bundle, providers="cpu")
    with pytest.raises(BundleError, match="differ from the contract"):
        check_graph_inputs(engine.session, {"history_codes": np.int64}, "beam_search.onnx")
    expected = {i.name: np.int32 for i in engine.session.get_inputs()}
    with pytest.raises(BundleError, match="history_codes is tensor\\(int64\\)"):
        check_graph_inputs(engine.session, expected, "beam_search.onnx")
