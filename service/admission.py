"""Admission by expected latency: refuse at once (429) a request that would miss the latency budget.

A bounded queue alone admits a request whenever there is room, so under overload every accepted
request waits out the whole queue (hundreds of ms against a 50 ms budget). Here a request is
admitted only if the time it is expected to take from joining the queue to its answer fits the
budget. The expected time comes from what the batcher measures, not from a guess:

    batch_s  = EWMA of the wall time of an engine call (dispatch to result), per batch
    own      = queued // max_batch_size: its batch among the queued ones
    start    = 0 when a free worker takes its batch; else the time until the first computing batch
               ends (batch_s less how long it has run), plus one batch_s per round of
               `engine_workers` batches queued ahead of it
    expected = start + batch_s

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BATCH_SHARE_OF_BUDGET = 0.4  # of the budget after the batching window: the batch in flight, its own, and a margin
FULL_BATCHES_PER_DECISION = 3  # full batches measured at a cap before it moves again

@dataclass(frozen=True)
class AdmissionDecision:
    admitted: bool
    expected_s: float  # expected time from now to the answer
    retry_after_s: int  # for the 429's Retry-After header


class AdmissionController:
    """Tracks the engine's batch time and decides whether a request can be answered in budget."""

    def __init__(self, budget_s: float, max_batch_size: int, engine_workers: int, *, max_wait_s: float = 0.0,
                 ewma_weight: float = 0.2, adapt_batch_size: bool = True) -> None:
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

    def expected_s(self, queued: int, busy_workers: int, longest_running_s: float = 0.0) -> float:
        """Expected time until a request joining now is answered: `queued` requests are ahead of it
        in the queue, `busy_workers` engine workers are computing, the one computing longest has
        run `longest_running_s` (0: count a whole batch for it)."""
        if self.batch_s is None:
            return 0.0
        own_batch = queued // self.batch_cap
        free_workers = max(self.engine_workers - busy_workers, 0)
        if own_batch < free_workers:
            return self.max_wait_s + self.batch_s  # a free worker takes it, after the batching window
        first_free_s = max(self.batch_s - longest_running_s, 0.0)
        rounds_queued_ahead = (own_batch - free_workers) // self.engine_workers
        return first_free_s + rounds_queued_ahead * self.batch_s + self.batch_s

    def decide(self, queued: int, busy_workers: int, longest_running_s: float = 0.0) -> AdmissionDecision:
        """Time spent before the queue (reading the history) is not counted: a request slowed by a
        hanging store is still served, degraded, if the engine has room for it. A request that a free
        worker takes at once is always admitted: refusing it would make no one faster, and on a
        machine where one batch takes longer than the budget it keeps the service answering (and
        measuring: with nothing admitted the batch time would never be measured again)."""
        expected = self.expected_s(queued, busy_workers, longest_running_s)
        starts_at_once = queued // self.batch_cap < self.engine_workers - busy_workers
        if not self.enabled or starts_at_once or expected <= self.budget_s:
            return AdmissionDecision(True, expected, 0)
        # When the queue ahead of it will have drained; whole seconds for Retry-After, at least 1.
        return AdmissionDecision(False, expected, max(1, math.ceil(expected)))
