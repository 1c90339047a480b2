"""A controllable stand-in for a beam engine, for batcher tests."""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np


class FakeEngine:
    """Item j of request b is history[0] * 100 + j, so each answer shows whose it is."""

    provider = "fake"

    def __init__(self, beam_size: int = 4, delay_s: float = 0.0, fail_with: Exception | None = None) -> None:
        self.beam_size = beam_size
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.batch_sizes: list[int] = []
        self.release = threading.Event()  # cleared -> search blocks until set
        self.release.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self.in_flight = 0  # searches running now
        self.max_in_flight = 0

    def search(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._answer(histories)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.entered.set()
        self.release.wait(timeout=30)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batch_sizes.append(len(histories))
        if self.fail_with is not None:
            raise self.fail_with
        first = np.array([int(h[0]) for h in histories], dtype=np.int64)[:, None]  # (B, 1)
        items = first * 100 + np.arange(self.beam_size)  # (B, beam)
        scores = -np.arange(self.beam_size, dtype=np.float32)[None, :].repeat(len(histories), 0)
        return items, scores
