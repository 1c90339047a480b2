"""Admission by expected latency: refuse at once (429) a request that would miss the latency budget.

A bounded queue alone admits a request whenever there is room, so under overload every accepted
request waits out the whole queue (hundreds of ms against a 50 ms budget). Here a request is
admitted only if the time it is expected to take from joining the queue to its answer fits the
budget. The expected time comes from what the batcher measures, not from a guess:

    batch_s  = EWMA of the wall time of an engine call (dispatch to result), per batch
    own      = queued // batch_cap: its batch among the queued ones
    start    = when a worker takes its batch: the queued batches go, in order, to whichever worker
               frees first; a free worker is free now, a computing one when its batch ends (batch_s
               less how long it has run), and every batch keeps its worker batch_s
    expected = start + batch_s (+ the batching window when a free worker takes it at once)

The estimate uses full-batch times under load (where it matters, batches are full) and is pure
arithmetic on numbers the batcher hands in, so tests drive it without a clock.

Batch size from the budget: a request admitted while every worker computes waits for one batch,
then computes in its own, so a batch that takes more than half the budget breaks it for every
request queued behind it, however well admission counts. The controller therefore caps the batch
size (`batch_cap`, at most max_batch_size): full batches slower than `batch_target_s` (40% of the
budget after the batching window: two batch times and a fifth for the time around the engine) lower
it by one; full batches fast enough that one more request would still fit raise it again (the
estimate scales the time with the size, an overestimate since a batch's fixed cost does not grow).
Smaller batches serve fewer requests a second, so more are refused at 429: the trade the budget asks for.

Calibration: under overload admission keeps the queue at the edge of the budget, so admitted requests'
expected times sit just under it and the estimate's errors (a slower batch, a worker preempted) put a
good share of them over. The controller therefore admits below a threshold it tunes from the answers
themselves (those it admitted to wait behind computing batches; one a free worker takes at once is
admitted whatever the threshold): each whose time from joining the queue to its answer passes 60% of
the budget (the rest is for the time before the queue, which the batcher cannot time) lowers the
threshold by 1% of the budget, each on time raises it by 1/99 of that, so it settles where about
1 in 100 is late (a quantile tracker), never above the budget nor below a fifth of it.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Admission's own check: of the requests it admits, at most this share may take longer from joining
# the queue to their answer than QUEUE_SHARE_OF_BUDGET x the budget. The rest of the budget is for what
# the batcher cannot time: reading the history, HTTP parsing, the socket, a busy CPU before the route runs.
LATE_SHARE = 0.01
QUEUE_SHARE_OF_BUDGET = 0.6
THRESHOLD_STEP = 0.01  # of the budget: how far one late answer lowers the admission threshold
MIN_THRESHOLD_SHARE = 0.2
BATCH_SHARE_OF_BUDGET = 0.4  # of the budget after the batching window: the batch in flight, its own, and a margin
FULL_BATCHES_PER_DECISION = 3  # full batches measured at a cap before it moves again


@dataclass(frozen=True)
class AdmissionDecision:
    admitted: bool
    expected_s: float  # expected time from now to the answer
    retry_after_s: int  # for the 429's Retry-After header
    at_once: bool = False  # a free worker takes it: admitted whatever the threshold


class AdmissionController:
    """Tracks the engine's batch time and decides whether a request can be answered in budget."""

    def __init__(self, budget_s: float, max_batch_size: int, engine_workers: int, *, max_wait_s: float = 0.0,
                 ewma_weight: float = 0.2, adapt_batch_size: bool = False) -> None:
        if not 0 < ewma_weight <= 1:
            raise ValueError(f"ewma_weight must be in (0, 1], got {ewma_weight}")
        self.budget_s = budget_s
        self.max_batch_size = max_batch_size
        self.engine_workers = engine_workers
        self.max_wait_s = max_wait_s
        self.ewma_weight = ewma_weight
        self.batch_s: float | None = None  # None until the first batch is measured: admit everything
        self.adapt_batch_size = adapt_batch_size
        self.batch_cap = max_batch_size  # the batcher closes a batch at this many requests
        self.threshold_s = budget_s  # admit while the expected time is within it (observe_answer tunes it)
        self._full_batch_s: float | None = None  # EWMA of full batches at the current cap
        self._full_batches = 0

    @property
    def batch_target_s(self) -> float:
        """The longest a batch may take: a request may wait for one computing batch, then its own."""
        return BATCH_SHARE_OF_BUDGET * max(self.budget_s - self.max_wait_s, 0.0)

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    def observe_batch(self, seconds: float, size: int | None = None) -> None:
        """One engine call's wall time (as the event loop saw it) and its number of requests."""
        if self.batch_s is None:
            self.batch_s = seconds
        else:
            self.batch_s += self.ewma_weight * (seconds - self.batch_s)
        if size is not None and size >= self.batch_cap and self.enabled and self.adapt_batch_size:
            self._observe_full_batch(seconds)

    def observe_answer(self, seconds: float) -> None:
        """An admitted request's time from joining the queue to its answer."""
        if not self.enabled:
            return
        step = THRESHOLD_STEP * self.budget_s
        if seconds > QUEUE_SHARE_OF_BUDGET * self.budget_s:
            self.threshold_s = max(self.threshold_s - step, MIN_THRESHOLD_SHARE * self.budget_s)
        else:
            self.threshold_s = min(self.threshold_s + step * LATE_SHARE / (1.0 - LATE_SHARE), self.budget_s)

    def _observe_full_batch(self, seconds: float) -> None:
        if self._full_batch_s is None:
            self._full_batch_s = seconds
        else:
            self._full_batch_s += self.ewma_weight * (seconds - self._full_batch_s)
        self._full_batches += 1
        if self._full_batches < FULL_BATCHES_PER_DECISION:
            return
        target, cap = self.batch_target_s, self.batch_cap
        if self._full_batch_s > target and cap > 1:
            self._set_cap(cap - 1)
        elif cap < self.max_batch_size and self._full_batch_s * (cap + 1) / cap <= target:
            self._set_cap(cap + 1)

    def _set_cap(self, cap: int) -> None:
        self.batch_cap = cap
        self._full_batch_s = None
        self._full_batches = 0

    def expected_s(self, queued: int, running_s: Sequence[float] = ()) -> float:
        """Expected time until a request joining now is answered: `queued` requests are ahead of it
        in the queue and `running_s` holds how long each computing batch has run."""
        if self.batch_s is None:
            return 0.0
        own_batch = queued // self.batch_cap
        free_workers = max(self.engine_workers - len(running_s), 0)
        if own_batch < free_workers:
            return self.max_wait_s + self.batch_s  # a free worker takes it, after the batching window
        # When each worker is next free; the queued batches take them in turn, earliest first.
        free_at = [0.0] * free_workers + [max(self.batch_s - ran, 0.0) for ran in running_s]
        heapq.heapify(free_at)
        for _ in range(own_batch):
            heapq.heapreplace(free_at, free_at[0] + self.batch_s)
        return free_at[0] + self.batch_s

    def decide(self, queued: int, running_s: Sequence[float] = ()) -> AdmissionDecision:
        """Time spent before the queue (reading the history) is not counted: a request slowed by a
        hanging store is still served, degraded, if the engine has room for it. A request that a free
        worker takes at once is always admitted: refusing it would make no one faster, and on a
        machine where one batch takes longer than the budget it keeps the service answering (and
        measuring: with nothing admitted the batch time would never be measured again)."""
        expected = self.expected_s(queued, running_s)
        starts_at_once = queued // self.batch_cap < self.engine_workers - len(running_s)
        if not self.enabled or starts_at_once or expected <= self.threshold_s:
            return AdmissionDecision(True, expected, 0, at_once=starts_at_once)
        # When the queue ahead of it will have drained; whole seconds for Retry-After, at least 1.
        return AdmissionDecision(False, expected, max(1, math.ceil(expected)))
