from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import numpy as np
import pytest

from service.batcher import Batch, BatcherClosed, DeadlineExceeded, MicroBatcher, PendingRequest, QueueFull
from service.metrics import ServiceMetrics
from tests.service.fakes import FakeEngine


def make_batcher(engine: FakeEngine, **overrides: float) -> MicroBatcher:
    options = dict(max_batch_size=8, max_wait_ms=5.0, max_queue_size=64)
    options.update(overrides)
    return MicroBatcher(engine, metrics=ServiceMetrics(), **options)  # type: ignore[arg-type]


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def test_batch_closes_at_max_batch_size_without_waiting_for_the_timer() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=4, max_wait_ms=5_000)
        await batcher.start()
        started = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(np.array([i]), deadline_in(10)) for i in range(4)))
        assert time.perf_counter() - started < 2.0  # far below the 5 s window
        assert engine.batch_sizes == [4]
        for i, result in enumerate(results):  # each caller gets its own row
            assert result.item_indices.tolist() == [i * 100 + j for j in range(4)]
            assert result.batch_size == 4
        await batcher.close(1.0)

    asyncio.run(main())


def test_batch_closes_at_max_wait() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=100, max_wait_ms=50)
        await batcher.start()
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit(np.array([i]), deadline_in(10)) for i in range(3)))
        elapsed = time.perf_counter() - started
        assert engine.batch_sizes == [3]
        assert 0.04 <= elapsed < 1.0
        await batcher.close(1.0)

    asyncio.run(main())


def test_with_a_spare_worker_a_batch_closes_at_once_when_nothing_is_coming() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=8, max_wait_ms=5_000, engine_workers=2)
        await batcher.start()
        started = time.perf_counter()
        await batcher.submit(np.array([1]), deadline_in(10))
        assert time.perf_counter() - started < 2.0  # far below the 5 s window
        assert engine.batch_sizes == [1]
        await batcher.close(1.0)

    asyncio.run(main())


def test_a_batch_waits_for_a_request_still_reading_its_history() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=8, max_wait_ms=5_000, engine_workers=2)
        await batcher.start()

        async def late_request() -> None:
            with batcher.coming():  # admitted, reading its history
                await asyncio.sleep(0.05)
            await batcher.submit(np.array([2]), deadline_in(10))

        late = asyncio.create_task(late_request())
        await asyncio.sleep(0)  # the late request is on its way before the first is queued
        started = time.perf_counter()
        await asyncio.gather(batcher.submit(np.array([1]), deadline_in(10)), late)
        assert engine.batch_sizes == [2]  # one batch: the first waited for the one coming
        assert time.perf_counter() - started < 2.0  # and closed when it arrived, not at the window
        await batcher.close(1.0)

    asyncio.run(main())


@pytest.mark.parametrize(("engine_workers", "close_when_none_coming"), [(1, True), (2, False)],
                         ids=["on-the-last-free-worker", "closing-early-turned-off"])
def test_a_batch_waits_out_the_window(engine_workers: int, close_when_none_coming: bool) -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=8, max_wait_ms=200, engine_workers=engine_workers,
                               close_when_none_coming=close_when_none_coming)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(np.array([1]), deadline_in(10)))
        await asyncio.sleep(0.05)  # nothing coming; with one worker, later requests would wait for it anyway
        await asyncio.gather(first, batcher.submit(np.array([2]), deadline_in(10)))
        assert engine.batch_sizes == [2]
        await batcher.close(1.0)

    asyncio.run(main())


def test_requests_beyond_max_batch_size_go_to_the_next_batch() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=3, max_wait_ms=20)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(np.array([i]), deadline_in(10)) for i in range(7)))
        assert sorted(engine.batch_sizes, reverse=True) == [3, 3, 1]
        await batcher.close(1.0)

    asyncio.run(main())


def test_full_queue_is_refused_at_once() -> None:
    async def main() -> None:
        engine = FakeEngine()
        engine.release.clear()  # the engine holds the first batch
        batcher = make_batcher(engine, max_batch_size=1, max_wait_ms=0, max_queue_size=2)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(np.array([0]), deadline_in(10)))
        await asyncio.to_thread(engine.entered.wait, 5)
        queued = [asyncio.create_task(batcher.submit(np.array([i]), deadline_in(10))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(np.array([3]), deadline_in(10))
        assert time.perf_counter() - started < 0.1
        assert refused.value.retry_after_s >= 1
        engine.release.set()
        results = await asyncio.gather(first, *queued)
        assert [r.item_indices[0] for r in results] == [0, 100, 200]
        await batcher.close(1.0)

    asyncio.run(main())


def test_deadline_gives_up_while_the_engine_is_busy_and_the_late_result_is_dropped() -> None:
    async def main() -> None:
        engine = FakeEngine(delay_s=0.3)
        batcher = make_batcher(engine, max_wait_ms=0)
        await batcher.start()
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(np.array([1]), deadline_in(0.05))
        assert time.perf_counter() - started < 0.25
        # the batcher still serves afterwards
        result = await batcher.submit(np.array([2]), deadline_in(5))
        assert result.item_indices[0] == 200
        await batcher.close(1.0)

    asyncio.run(main())


def test_expired_requests_are_left_out_of_the_batch() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        live = PendingRequest(np.array([1]), now + 10, now, loop.create_future())
        expired = PendingRequest(np.array([2]), now - 0.001, now, loop.create_future())
        abandoned = PendingRequest(np.array([3]), now + 10, now, loop.create_future())
        abandoned.future.cancel()
        batch = Batch.from_requests([live, expired, abandoned], now)
        assert batch.requests == [live]
        assert isinstance(expired.future.exception(), DeadlineExceeded)
        assert len(batch.filter(lambda r: False)) == 0
        batch.complete(np.array([[7, 8]]), np.array([[-1.0, -2.0]], dtype=np.float32), started_at=now + 1, engine_s=0.5)
        assert live.future.result().item_indices.tolist() == [7, 8]
        assert live.future.result().queue_wait_s == pytest.approx(1.0)

    asyncio.run(main())


def test_engine_error_reaches_the_callers_of_that_batch_only() -> None:
    async def main() -> None:
        engine = FakeEngine(fail_with=RuntimeError("boom"))
        batcher = make_batcher(engine, max_wait_ms=0)
        await batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(np.array([1]), deadline_in(5))
        engine.fail_with = None
        assert (await batcher.submit(np.array([4]), deadline_in(5))).item_indices[0] == 400
        await batcher.close(1.0)

    asyncio.run(main())


def test_close_drains_queued_requests_then_refuses_new_ones() -> None:
    async def main() -> None:
        engine = FakeEngine(delay_s=0.05)
        batcher = make_batcher(engine, max_batch_size=2, max_wait_ms=0)
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit(np.array([i]), deadline_in(10))) for i in range(6)]
        await asyncio.sleep(0)  # let them enqueue
        await batcher.close(5.0)
        results = await asyncio.gather(*pending)
        assert [r.item_indices[0] for r in results] == [i * 100 for i in range(6)]
        assert sum(engine.batch_sizes) == 6
        with pytest.raises(BatcherClosed):
            await batcher.submit(np.array([9]), deadline_in(5))

    asyncio.run(main())


def test_close_is_bounded_when_the_engine_hangs() -> None:
    async def main() -> None:
        engine = FakeEngine()
        engine.release.clear()
        batcher = make_batcher(engine, max_batch_size=1, max_wait_ms=0)
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit(np.array([i]), deadline_in(30))) for i in range(3)]
        await asyncio.to_thread(engine.entered.wait, 5)
        started = time.perf_counter()
        await batcher.close(0.1)
        assert time.perf_counter() - started < 1.0
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(o, BatcherClosed) for o in outcomes)
        engine.release.set()

    asyncio.run(main())


def test_metrics_record_batches_and_rejections() -> None:
    async def main() -> None:
        engine = FakeEngine()
        metrics = ServiceMetrics()
        batcher = MicroBatcher(engine, max_batch_size=4, max_wait_ms=1, max_queue_size=4, metrics=metrics)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(np.array([i]), deadline_in(5)) for i in range(4)))
        await batcher.close(1.0)
        with pytest.raises(BatcherClosed):
            await batcher.submit(np.array([1]), deadline_in(5))
        registry = metrics.registry
        assert registry.get_sample_value("genrec_batch_size_count") == 1
        assert registry.get_sample_value("genrec_batch_size_sum") == 4
        assert registry.get_sample_value("genrec_queue_wait_seconds_count") == 4
        assert registry.get_sample_value("genrec_rejections_total", {"reason": "draining"}) == 1

    asyncio.run(main())


def test_engine_workers_run_batches_side_by_side_and_each_takes_what_queued_meanwhile() -> None:
    async def main() -> None:
        engine = FakeEngine()
        engine.release.clear()
        batcher = make_batcher(engine, max_batch_size=2, max_wait_ms=0, engine_workers=2)
        await batcher.start()
        first = []
        for i in range(2):  # one request per batch until both workers are busy
            first.append(asyncio.create_task(batcher.submit(np.array([i]), deadline_in(10))))
            while engine.in_flight < i + 1:
                await asyncio.sleep(0.005)
        queued = [asyncio.create_task(batcher.submit(np.array([i]), deadline_in(10))) for i in range(2, 6)]
        await asyncio.sleep(0.05)
        assert engine.in_flight == 2 and batcher.queue_size == 4  # nobody starts a third batch
        engine.release.set()
        results = await asyncio.gather(*first, *queued)
        assert [r.item_indices[0] for r in results] == [i * 100 for i in range(6)]
        assert engine.max_in_flight == 2
        assert sorted(engine.batch_sizes) == [1, 1, 2, 2]  # the four queued ones went out in full batches
        await batcher.close(1.0)

    asyncio.run(main())


def test_engine_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="engine_workers"):
        make_batcher(FakeEngine(), engine_workers=0)


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread only on Linux; elsewhere engine_nice is a no-op")
def test_engine_threads_run_below_the_event_loop_priority() -> None:
    class NiceRecordingEngine(FakeEngine):
        def search(self, histories):
            self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super().search(histories)

    async def main() -> None:
        engine = NiceRecordingEngine()
        batcher = make_batcher(engine, engine_nice=5)
        await batcher.start()
        await batcher.submit(np.array([1]), deadline_in(10))
        await batcher.close(1.0)
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert engine.nice == min(19, loop_nice + 5)

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux call; elsewhere pinning is off")
@pytest.mark.parametrize("pin", [True, False])
def test_pinned_engine_workers_each_get_one_of_the_allowed_cpus(pin: bool) -> None:
    class AffinityRecordingEngine(FakeEngine):
        def search(self, histories):
            self.affinities[threading.get_native_id()] = os.sched_getaffinity(0)
            return super().search(histories)

    allowed = sorted(os.sched_getaffinity(0))

    async def main() -> None:
        engine = AffinityRecordingEngine()
        engine.affinities = {}
        engine.release.clear()
        batcher = make_batcher(engine, max_batch_size=1, max_wait_ms=0, engine_workers=2, pin_engine_threads=pin)
        await batcher.start()
        tasks = []
        for i in range(2):  # hold the first batch so the second one needs the other worker thread
            tasks.append(asyncio.create_task(batcher.submit(np.array([i]), deadline_in(10))))
            while engine.in_flight < i + 1:
                await asyncio.sleep(0.005)
        engine.release.set()
        await asyncio.gather(*tasks)
        await batcher.close(1.0)
        cpu_sets = list(engine.affinities.values())
        assert len(cpu_sets) == 2  # two worker threads
        if pin:
            assert sorted(cpu_sets, key=min) == [{allowed[0]}, {allowed[1 % len(allowed)]}]
        else:
            assert cpu_sets == [set(allowed)] * 2
        assert os.sched_getaffinity(0) == set(allowed)  # the event loop's thread is never pinned

    asyncio.run(main())


def test_engine_compute_time_is_measured_inside_the_worker_thread() -> None:
    async def main() -> None:
        engine = FakeEngine(delay_s=0.02)
        metrics = ServiceMetrics()
        batcher = MicroBatcher(engine, max_batch_size=4, max_wait_ms=1, max_queue_size=4, metrics=metrics)
        await batcher.start()
        result = await batcher.submit(np.array([1]), deadline_in(5))
        await batcher.close(1.0)
        registry = metrics.registry
        assert registry.get_sample_value("genrec_engine_compute_seconds_count") == 1
        compute_s = registry.get_sample_value("genrec_engine_compute_seconds_sum")
        assert 0.02 <= compute_s <= result.engine_s  # the loop sees the call end no earlier than the thread

    asyncio.run(main())
