"""Admission by expected latency, checked deterministically: the arithmetic on given numbers, the
batcher refusing a request that would wait past the budget (engine held, batch time set), and the
route's 429. Speed under real overload is measured by benchmarks/bench_overload.py, not here."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.admission import AdmissionController
from service.app import create_app
from service.batcher import MicroBatcher, OverBudget
from service.bundle import Bundle
from service.metrics import ServiceMetrics
from tests.service.fakes import FakeEngine
from tests.service.test_api import make_settings


def controller(budget_s: float = 0.05, batch_size: int = 8, workers: int = 2, batch_s: float | None = 0.01,
               max_wait_s: float = 0.0, adapt_batch_size: bool = False) -> AdmissionController:
    admission = AdmissionController(budget_s, batch_size, workers, max_wait_s=max_wait_s, adapt_batch_size=adapt_batch_size)
    if batch_s is not None:
        admission.observe_batch(batch_s)
    return admission


@pytest.mark.parametrize(
    ("queued", "busy", "rounds"),
    [
        (0, 0, 1),   # a free worker takes its batch at once: its own batch only
        (7, 1, 1),   # still the first queued batch, and one worker is free
        (8, 1, 2),   # second queued batch: waits for the computing round
        (0, 2, 2),   # every worker busy: one round, then its own
        (16, 2, 3),  # two full batches ahead of it and no free worker: 1 + 1 rounds, then its own
        (31, 2, 3),
        (32, 2, 4),
    ],
)
def test_expected_latency_counts_the_rounds_of_batches_ahead(queued: int, busy: int, rounds: int) -> None:
    assert controller().expected_s(queued, [0.0] * busy) == pytest.approx(rounds * 0.01)


def test_a_computing_batch_counts_only_its_remaining_time() -> None:
    admission = controller(batch_s=0.04)
    assert admission.expected_s(0, [0.03, 0.0]) == pytest.approx(0.01 + 0.04)  # the first worker to free takes it
    assert admission.expected_s(0, [0.5, 0.5]) == pytest.approx(0.04)  # overdue: ends any moment
    assert admission.expected_s(0, [0.03]) == pytest.approx(0.04)  # a free worker takes it
    assert admission.decide(0, [0.03, 0.0]).admitted  # 50 ms: within the budget
    assert not admission.decide(0, [0.0, 0.0]).admitted  # 80 ms


def test_queued_batches_take_the_workers_in_the_order_they_free() -> None:
    admission = controller(batch_s=0.04)
    # The second queued batch waits for the second worker, which computes for 40 ms more, not 10.
    assert admission.expected_s(8, [0.03, 0.0]) == pytest.approx(0.04 + 0.04)
    assert not admission.decide(8, [0.03, 0.0]).admitted
    # The third takes the first worker again after its next batch: 10 + 40 ms, then its own 40.
    assert admission.expected_s(16, [0.03, 0.0]) == pytest.approx(0.01 + 0.04 + 0.04)
    # With a free worker the first queued batch takes it; the second waits for the first busy one.
    assert admission.expected_s(8, [0.03]) == pytest.approx(0.01 + 0.04)


def test_a_batch_that_starts_at_once_adds_the_batching_window() -> None:
    admission = controller(max_wait_s=0.002)
    assert admission.expected_s(0, []) == pytest.approx(0.012)
    assert admission.expected_s(0, [0.0, 0.0]) == pytest.approx(0.02)  # it waits for a worker, not for the window


def test_the_batch_time_is_an_ewma_and_nothing_is_refused_before_the_first_batch() -> None:
    admission = controller(batch_s=None)
    assert admission.expected_s(10_000, [0.0, 0.0]) == 0.0 and admission.decide(10_000, [0.0, 0.0]).admitted
    admission.observe_batch(0.010)
    admission.observe_batch(0.020)
    assert admission.batch_s == pytest.approx(0.010 + 0.2 * 0.010)


def test_decide_compares_the_expected_latency_with_the_budget_and_says_when_to_retry() -> None:
    admission = controller(budget_s=0.05, batch_s=0.02)
    assert admission.decide(0, [0.0, 0.0]).admitted  # 40 ms expected
    late = admission.decide(16, [0.0, 0.0])  # third batch round: 60 ms > 50
    assert not late.admitted and late.expected_s == pytest.approx(0.06) and late.retry_after_s == 1
    swamped = controller(budget_s=0.05, batch_s=1.0).decide(64, [0.0, 0.0])
    # 8 batches ahead, no free worker: the computing round + 4 rounds of 2 batches, then its own: 6 s
    assert not swamped.admitted and swamped.retry_after_s == 6
    assert controller(budget_s=0.0, batch_s=1.0).decide(64, [0.0, 0.0]).admitted  # budget 0: off


def test_a_request_a_free_worker_takes_at_once_is_admitted_even_past_the_budget() -> None:
    slow = controller(budget_s=0.05, batch_s=0.2)  # one batch alone takes 4x the budget
    assert slow.decide(0, [0.0]).admitted and slow.decide(7, []).admitted  # a worker is free for its batch
    assert not slow.decide(0, [0.0, 0.0]).admitted and not slow.decide(16, [0.0]).admitted  # it would wait for one


def test_the_batcher_refuses_at_once_what_would_wait_past_the_budget() -> None:
    async def main() -> None:
        engine = FakeEngine()
        engine.release.clear()  # the engine holds its first batch until released
        metrics = ServiceMetrics()
        admission = controller(budget_s=0.05, batch_size=1, workers=1, batch_s=1.0)  # a batch takes 1 s
        batcher = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0, max_queue_size=64, admission=admission,
                               metrics=metrics)
        await batcher.start()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(batcher.submit(np.array([1]), loop.time() + 10))
        await asyncio.to_thread(engine.entered.wait, 10)  # computing: no worker free
        # Expected: the rest of the computing batch (about 1 s), then its own: about 2 s > 50 ms.
        with pytest.raises(OverBudget, match="latency budget of 50 ms"):
            await batcher.submit(np.array([2]), loop.time() + 10)
        assert batcher.queue_size == 0  # refused, not queued
        assert metrics.registry.get_sample_value("genrec_rejections_total", {"reason": "over_budget"}) == 1

        admission.budget_s = 0.0  # off: the old policy queues it
        second = asyncio.create_task(batcher.submit(np.array([2]), loop.time() + 10))
        await asyncio.sleep(0)
        engine.release.set()
        assert (await first).item_indices[0] == 100 and (await second).item_indices[0] == 200
        await batcher.close(1.0)

    asyncio.run(main())


def test_the_route_answers_429_with_retry_after_when_over_budget(demo_bundle_dir: Path, demo_bundle: Bundle) -> None:
    settings = make_settings(demo_bundle_dir, latency_budget_ms=50, engine_workers=2, max_batch_size=1)
    with TestClient(create_app(settings)) as client:
        history = [demo_bundle.item_ids[int(i)] for i in demo_bundle.popularity[:3]]
        assert client.post("/recommend", json={"history": history, "k": 3}).status_code == 200
        batcher = client.app.state.genrec.serving.batcher  # type: ignore[attr-defined]
        release = threading.Event()
        search = batcher.engine.search

        def held_search(histories):  # both workers compute until released
            release.wait(30)
            return search(histories)

        batcher.engine.search = held_search
        batcher.admission.batch_s = 2.0  # as if each batch took 2 s
        holders = [threading.Thread(target=client.post, args=("/recommend",), kwargs={"json": {"history": history}})
                   for _ in range(2)]
        for holder in holders:
            holder.start()
        try:
            deadline = time.monotonic() + 30
            while len(batcher._running) < 2:  # both workers busy
                assert time.monotonic() < deadline
                time.sleep(0.01)
            response = client.post("/recommend", json={"history": history, "k": 3})
            # Not headed for the engine, or not a JSON object: the gate lets them through to the app.
            popular = client.post("/recommend", json={"k": 3})
            malformed = client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
        finally:
            release.set()
            for holder in holders:
                holder.join()
        # the rest of the computing round (up to 2 s) and its own batch (2 s)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 3
        assert "latency budget of 50 ms" in response.json()["detail"]
        assert popular.status_code == 200 and popular.json()["strategy"] == "popular"
        assert malformed.status_code == 400
        registry = client.app.state.genrec.metrics.registry  # type: ignore[attr-defined]
        assert registry.get_sample_value("genrec_requests_total", {"endpoint": "/recommend", "status": "429"}) == 1


def test_full_batches_slower_than_the_target_lower_the_batch_cap_and_fast_ones_raise_it() -> None:
    admission = controller(budget_s=0.05, batch_size=8, batch_s=None, max_wait_s=0.0, adapt_batch_size=True)
    assert admission.batch_target_s == pytest.approx(0.02)  # 40% of 50 ms: the batch in flight, its own, a margin
    for _ in range(3):
        admission.observe_batch(0.03, size=8)  # full batches over the 20 ms target
    assert admission.batch_cap == 7
    for _ in range(2):
        admission.observe_batch(0.03, size=7)
    assert admission.batch_cap == 7  # a decision waits for 3 full batches at the new cap
    for _ in range(4):  # the third at 7, then three at 6
        admission.observe_batch(0.03, size=admission.batch_cap)
    assert admission.batch_cap == 5
    for _ in range(20):
        admission.observe_batch(0.005, size=3)  # partial batches say nothing about a full one
    assert admission.batch_cap == 5
    for _ in range(3):
        admission.observe_batch(0.012, size=5)  # 12 ms x 6/5 = 14.4 ms still fits 20 ms: one more
    assert admission.batch_cap == 6
    for _ in range(3):
        admission.observe_batch(0.018, size=6)  # 18 ms x 7/6 = 21 ms would not fit: stays
    assert admission.batch_cap == 6
    # The expected latency counts batches of the cap, not of max_batch_size.
    assert admission.expected_s(12, [0.0, 0.0]) == pytest.approx(3 * admission.batch_s)


def test_the_batch_cap_stays_at_max_batch_size_when_adapting_is_off_or_there_is_no_budget() -> None:
    for admission in (AdmissionController(0.05, 8, 2), AdmissionController(0.0, 8, 2, adapt_batch_size=True)):
        for _ in range(10):
            admission.observe_batch(1.0, size=8)
        assert admission.batch_cap == 8


def test_the_batcher_closes_batches_at_the_admission_cap() -> None:
    async def main() -> None:
        engine = FakeEngine()
        admission = AdmissionController(10.0, 8, 1)
        admission.batch_cap = 3
        metrics = ServiceMetrics()
        batcher = MicroBatcher(engine, max_batch_size=8, max_wait_ms=5_000, max_queue_size=64, engine_workers=1,
                               admission=admission, metrics=metrics)
        engine.release.clear()  # the first batch holds the only worker while the rest queue
        await batcher.start()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(batcher.submit(np.array([0]), loop.time() + 10))
        await asyncio.to_thread(engine.entered.wait, 10)
        rest = [asyncio.create_task(batcher.submit(np.array([i]), loop.time() + 10)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        engine.release.set()
        results = await asyncio.gather(first, *rest)
        assert [r.item_indices[0] for r in results] == [i * 100 for i in range(7)]
        assert engine.batch_sizes == [1, 3, 3]
        assert metrics.registry.get_sample_value("genrec_batch_cap") == 3
        await batcher.close(1.0)

    asyncio.run(main())


def test_the_threshold_settles_where_about_one_admitted_answer_in_a_hundred_is_late() -> None:
    admission = controller(budget_s=0.05)
    rng = np.random.default_rng(0)
    # Answers take the admission threshold plus a noisy estimate error: late ones (> 30 ms, 60% of the
    # budget) lower it, on-time ones raise it a little.
    late = []
    for _ in range(20_000):
        answer = admission.threshold_s + rng.normal(0.0, 0.01)
        late.append(answer > 0.03)
        admission.observe_answer(answer)
    assert admission.threshold_s < 0.03 - 0.015  # well under the late line, to absorb the error
    assert 0.003 < np.mean(late[-10_000:]) < 0.03
    for _ in range(10_000):  # load gone: answers fast, the threshold climbs back to the budget
        admission.observe_answer(0.005)
    assert admission.threshold_s == pytest.approx(0.05)
    assert admission.decide(0, [0.0, 0.0]).admitted  # 20 ms expected (batch_s 10 ms)
    admission.threshold_s = 0.015
    assert not admission.decide(0, [0.0, 0.0]).admitted  # 20 ms > the tuned threshold, though < the budget


def test_only_answers_admitted_to_wait_tune_the_threshold() -> None:
    async def main() -> None:
        engine = FakeEngine(delay_s=0.03)
        admission = AdmissionController(0.01, 8, 1)  # 10 ms budget: every answer here is late
        batcher = MicroBatcher(engine, max_batch_size=8, max_wait_ms=0, max_queue_size=64, engine_workers=1,
                               admission=admission, metrics=ServiceMetrics())
        await batcher.start()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(batcher.submit(np.array([1]), loop.time() + 10))  # a free worker: at once
        await asyncio.to_thread(engine.entered.wait, 10)
        second = asyncio.create_task(batcher.submit(np.array([2]), loop.time() + 10))  # waits behind it
        await asyncio.gather(first, second)
        # Only the second one's late answer lowered the threshold, by 1% of the budget.
        assert admission.threshold_s == pytest.approx(0.01 - 0.0001)
        await batcher.close(1.0)

    asyncio.run(main())
