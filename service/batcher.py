"""Async micro-batcher: requests queue up (bounded), a batch closes at max_batch_size or max_wait_ms,
and the engine runs it in a worker thread so the event loop stays free. Up to `engine_workers`
batches run at once (onnxruntime sessions are thread-safe): while one batch computes, the next one
starts on a free worker instead of queueing behind it.

Every wait is bounded: a request that would miss the latency budget (OverBudget, see
service/admission.py) or finds the queue full (QueueFull) is refused at once (429), a request past
its deadline gives up (DeadlineExceeded -> 503), and shutdown drains within a time limit.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.admission import AdmissionController
from service.constraints import Restriction, search_grouped
from service.engine import BeamEngine
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

LOOP_LAG_INTERVAL_S = 0.01  # the event-loop lag probe's timer


class BatcherError(Exception):
    """A request the batcher could not serve; the route maps each kind to a status."""


class OverCapacity(BatcherError):
    """Refused before queueing (429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(OverCapacity):
    def __init__(self, queue_size: int, retry_after_s: int = 1) -> None:
        super().__init__(f"server is at capacity ({queue_size} requests queued); retry after {retry_after_s}s",
                         retry_after_s)


class OverBudget(OverCapacity):
    def __init__(self, expected_s: float, budget_s: float, retry_after_s: int) -> None:
        super().__init__(f"server is at capacity: the answer would take about {expected_s * 1e3:.0f} ms against a "
                         f"latency budget of {budget_s * 1e3:.0f} ms; retry after {retry_after_s}s", retry_after_s)


class DeadlineExceeded(BatcherError):
    pass


class BatcherClosed(BatcherError):
    def __init__(self) -> None:
        super().__init__("server is shutting down and accepts no new work")


@dataclass(frozen=True)
class SearchResult:
    item_indices: np.ndarray  # (beam,) int64, -1 where the beam found no item
    scores: np.ndarray  # (beam,) float32, sum of code log-probabilities
    queue_wait_s: float
    engine_s: float
    batch_size: int


@dataclass(eq=False)
class PendingRequest:
    history: np.ndarray  # (n,) int64 item indices, oldest first, non-empty
    deadline: float  # event-loop time
    enqueued_at: float  # event-loop time
    future: asyncio.Future[SearchResult] = field(repr=False)
    restriction: Restriction | None = None  # a per-request constraint: search only its allowed items
    # Admitted by the threshold (it waits for a computing batch), not taken at once by a free worker:
    # only these answers tell admission whether its threshold is right.
    admitted_by_threshold: bool = False

    @property
    def waiting(self) -> bool:
        """False once answered, failed, or abandoned by its caller (cancelled on timeout)."""
        return not self.future.done()


@dataclass
class Batch:
    """The contract between batcher and engine: the live requests of one engine call, in order."""

    requests: list[PendingRequest]

    @classmethod
    def from_requests(cls, requests: Sequence[PendingRequest], now: float) -> Batch:
        """Keeps requests still waiting; fails the ones whose deadline has passed."""
        live: list[PendingRequest] = []
        for request in requests:
            if not request.waiting:
                continue
            if request.deadline <= now:
                request.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(request)
        return cls(live)

    def filter(self, keep: Callable[[PendingRequest], bool]) -> Batch:
        return Batch([r for r in self.requests if keep(r)])

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[PendingRequest]:
        return iter(self.requests)

    @property
    def histories(self) -> list[np.ndarray]:
        return [r.history for r in self.requests]

    def complete(self, item_indices: np.ndarray, scores: np.ndarray, started_at: float, engine_s: float) -> None:
        """item_indices, scores: (B, beam), row b answers request b."""
        for request, items_row, scores_row in zip(self.requests, item_indices, scores):
            if request.waiting:
                request.future.set_result(
                    SearchResult(items_row, scores_row, started_at - request.enqueued_at, engine_s, len(self))
                )

    def fail(self, error: BaseException) -> None:
        for request in self.requests:
            if request.waiting:
                request.future.set_exception(error)


def lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value by `nice` (Linux, where nice is per thread). Engine workers
    run below the event loop, so reading the next request, Redis replies and sending answers are
    not held up behind a batch that computes on the same cores; the batch loses little."""
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as error:  # a sandbox may forbid it; serving goes on at normal priority
        log.warning("could not lower the engine thread's priority: %s", error)


class EngineThreadSetup:
    """Initializer of the engine worker threads: lower their priority and, when pinning, give worker
    i the i-th CPU the process may use (round robin). pin=None pins when those CPUs are no more than
    the workers. Unpinned, the scheduler balances threads by nice weight, so a nice-10 engine thread
    can share a core with the event loop or a client while the other core idles and run at a tenth
    of its speed; pinned, each batch keeps a core of its own (the event loop still preempts it)."""

    def __init__(self, nice: int, pin: bool | None, workers: int) -> None:
        self.nice = nice
        can_pin = hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")
        self.cpus = sorted(os.sched_getaffinity(0)) if can_pin else []
        self.pin = can_pin and (pin if pin is not None else len(self.cpus) <= workers)
        self._worker_index = itertools.count()  # next() is atomic under the GIL

    def __call__(self) -> None:
        lower_thread_priority(self.nice)
        if not self.pin:
            return
        index = next(self._worker_index)
        cpu = self.cpus[index % len(self.cpus)]
        try:
            os.sched_setaffinity(0, {cpu})  # 0: this thread only, on Linux
            log.info("engine worker %d pinned to CPU %d", index, cpu)
        except OSError as error:  # a sandbox may forbid it; serving goes on unpinned
            log.warning("could not pin the engine thread to a CPU: %s", error)


class MicroBatcher:
    def __init__(
        self,
        engine: BeamEngine,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_size: int,
        engine_workers: int = 1,
        engine_nice: int = 0,
        pin_engine_threads: bool | None = False,
        close_when_none_coming: bool = True,
        admission: AdmissionController | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        if engine_workers < 1:
            raise ValueError(f"engine_workers must be >= 1, got {engine_workers}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.engine_workers = engine_workers
        self._metrics = metrics
        self.admission = admission
        self._queue: asyncio.Queue[PendingRequest] = asyncio.Queue(maxsize=max_queue_size)
        self._executor = ThreadPoolExecutor(max_workers=engine_workers, thread_name_prefix="genrec-engine",
                                            initializer=EngineThreadSetup(engine_nice, pin_engine_threads, engine_workers))
        # A batch is gathered only once a worker is free, so it takes everything queued meanwhile.
        self._free_workers = asyncio.Semaphore(engine_workers)
        self._running: set[asyncio.Task[None]] = set()
        self._started_at: dict[asyncio.Task[None], float] = {}  # running batch -> event-loop time it started
        self._worker: asyncio.Task[None] | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        self._accepting = False
        self.close_when_none_coming = close_when_none_coming
        self._coming = 0  # requests admitted by the route that have not reached submit yet

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Marks a request on its way to submit (reading its history): an open batch waits for it
        (within max_wait_ms) instead of closing, and closes at once when none is on its way."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    @property
    def admission_enabled(self) -> bool:
        """Whether requests are admitted against a latency budget (else only the queue bound)."""
        return self.admission is not None and self.admission.enabled

    @property
    def batch_cap(self) -> int:
        """Where a batch closes now: the admission's cap, which fits batches to the latency budget."""
        if self.admission_enabled:
            return min(self.admission.batch_cap, self.max_batch_size)
        return self.max_batch_size

    @property
    def queue_size(self) -> int:
        return self._queue.qsize()

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="genrec-batcher")
        if self._lag_watch is None and self._metrics is not None:
            self._lag_watch = asyncio.create_task(self._watch_loop_lag(), name="genrec-loop-lag")
        if self._metrics is not None:
            self._metrics.batch_cap.set(self.batch_cap)
        self._accepting = True

    async def submit(self, history: np.ndarray, deadline: float, restriction: Restriction | None = None) -> SearchResult:
        """Queue one history and wait for its result until `deadline` (event-loop time). With a
        restriction the request is searched over its allowed items only (service/constraints.py)."""
        if not self._accepting:
            self._reject("draining")
            raise BatcherClosed()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline <= now:
            self._reject("deadline")
            raise DeadlineExceeded("deadline passed before the request was queued")
        admitted_by_threshold = self.check_admission()
        request = PendingRequest(history, deadline, now, loop.create_future(), restriction, admitted_by_threshold)
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self._reject("queue_full")
            raise QueueFull(self.max_queue_size) from None
        self._observe_queue_size()
        try:
            async with asyncio.timeout_at(deadline):
                return await request.future  # on timeout the future is cancelled; the worker skips it
        except TimeoutError:
            self._reject("deadline")
            raise DeadlineExceeded("deadline passed waiting for the engine") from None

    def check_admission(self) -> bool:
        """Raise OverBudget if a request joining the queue now would miss the latency budget; else
        whether it was admitted by the threshold (False: a free worker takes it at once, or no
        admission). The app's admission gate asks once before the request is parsed and validated
        (service/app.py AdmissionGateMiddleware: a refusal then costs little CPU and no Redis round
        trip) and submit asks again, as the queue may have grown meanwhile."""
        if not self.admission_enabled:
            return False
        now = asyncio.get_running_loop().time()
        decision = self.admission.decide(self._queue.qsize(), [now - started for started in self._started_at.values()])
        if not decision.admitted:
            self._reject("over_budget")
            raise OverBudget(decision.expected_s, self.admission.budget_s, decision.retry_after_s)
        return not decision.at_once

    async def close(self, timeout_s: float) -> None:
        """Stop accepting, finish what is queued within timeout_s, fail the rest with BatcherClosed."""
        self._accepting = False
        if self._lag_watch is not None:
            self._lag_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_watch
            self._lag_watch = None
        if self._worker is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._queue.join()
            except TimeoutError:
                log.warning("batcher drain timed out after %.1fs with %d queued", timeout_s, self.queue_size)
            self._worker.cancel()
            for task in list(self._running):  # drain timed out mid-batch: their callers get BatcherClosed
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(self._worker, *self._running, return_exceptions=True)
            self._worker = None
        while not self._queue.empty():
            request = self._queue.get_nowait()
            self._queue.task_done()
            if request.waiting:
                request.future.set_exception(BatcherClosed())
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._observe_queue_size()

    async def _watch_loop_lag(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """How late the event loop runs a timer (genrec_event_loop_lag_seconds): the wait every request
        has before its route runs and after its batch ends, which no stage's time shows."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(interval_s)
            self._metrics.loop_lag.observe(max(loop.time() - asked - interval_s, 0.0))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free_workers.acquire()
            try:
                requests = await self._gather(loop)
            except BaseException:
                self._free_workers.release()
                raise
            task = asyncio.create_task(self._run_and_release(requests, loop), name="genrec-batch")
            self._running.add(task)
            self._started_at[task] = loop.time()
            task.add_done_callback(self._batch_done)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[PendingRequest]:
        first = await self._queue.get()
        requests = [first]
        # The window starts when the first request arrived, not when a worker got free.
        close_at = first.enqueued_at + self.max_wait_s
        limit = self.batch_cap
        try:
            while len(requests) < limit:
                try:
                    requests.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if self.close_when_none_coming and self._coming == 0 and not self._free_workers.locked():
                    # Nothing queued or on its way and a worker stays free for what comes next:
                    # waiting would only add latency. On the last free worker the window runs out,
                    # filling the batch, as later requests would wait for a worker anyway.
                    break
                remaining = close_at - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        requests.append(await self._queue.get())
                except TimeoutError:
                    break
        except asyncio.CancelledError:  # shutdown while gathering: these are off the queue already
            Batch(requests).fail(BatcherClosed())
            for _ in requests:
                self._queue.task_done()
            raise
        self._observe_queue_size()
        return requests

    async def _run_and_release(self, requests: list[PendingRequest], loop: asyncio.AbstractEventLoop) -> None:
        try:
            await self._run_batch(Batch.from_requests(requests, loop.time()))
        except asyncio.CancelledError:
            Batch(requests).fail(BatcherClosed())
            raise
        except Exception:  # keep serving; the batch's futures were failed in _run_batch
            log.exception("micro-batch failed")
        finally:
            self._free_workers.release()
            for _ in requests:
                self._queue.task_done()

    async def _run_batch(self, batch: Batch) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
            for request in batch:
                self._metrics.queue_wait.observe(started_at - request.enqueued_at)
        try:
            item_indices, scores = await loop.run_in_executor(self._executor, self._search, batch.histories,
                                                              [r.restriction for r in batch])
        except Exception as error:
            batch.fail(error)
            raise
        batch_s = loop.time() - started_at
        if self.admission is not None:
            self.admission.observe_batch(batch_s, len(batch))
            for request in batch:
                if request.admitted_by_threshold:
                    self.admission.observe_answer(started_at + batch_s - request.enqueued_at)
            if self._metrics is not None:
                self._metrics.batch_cap.set(self.batch_cap)
                self._metrics.admission_threshold.set(self.admission.threshold_s)
        batch.complete(item_indices, scores, started_at, batch_s)

    def _search(self, histories: list[np.ndarray], restrictions: list[Restriction | None]) -> tuple[np.ndarray, np.ndarray]:
        """Runs in an engine worker thread: one engine call, or one per distinct restriction in the batch."""
        started = time.perf_counter()
        result = search_grouped(self.engine, histories, restrictions)
        if self._metrics is not None:
            self._metrics.engine_compute.observe(time.perf_counter() - started)
        return result

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._started_at.pop(task, None)

    def _reject(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejections.labels(reason=reason).inc()

    def _observe_queue_size(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_size.set(self._queue.qsize())
