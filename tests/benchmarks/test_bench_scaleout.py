"""bench_scaleout's measurement plan, against fake windows (no processes, no load): every setting gets
its time in ROUNDS windows in alternating order, and a setting's windows count as one measurement."""
from __future__ import annotations

import loadgen
from bench_scaleout import ROUNDS, combined, rounds


def test_rounds_alternate_the_order_and_split_the_time() -> None:
    calls: list[tuple[str, float]] = []

    def window(name: str, seconds: float) -> loadgen.LoadResult:
        calls.append((name, seconds))
        return loadgen.LoadResult("closed", None, seconds, latencies_s=[0.01] * 10, statuses={200: 10})

    result = rounds(["a", "b", "c"], window, seconds=20.0)
    assert [name for name, _ in calls] == (["a", "b", "c", "c", "b", "a"] * ROUNDS)[: 3 * ROUNDS]
    assert all(seconds == 20.0 / ROUNDS for _, seconds in calls)
    assert result["a"]["ok"] == 10 * ROUNDS and result["a"]["achieved_rps"] == round(10 * ROUNDS / 20.0, 1)


def test_combined_keeps_every_latency_and_status() -> None:
    fast = loadgen.LoadResult("open", 100.0, 2.0, latencies_s=[0.010] * 99, statuses={200: 99, 429: 1})
    slow = loadgen.LoadResult("open", 100.0, 2.0, latencies_s=[0.500] * 3, statuses={200: 3}, errors=2)
    summary = combined([fast, slow])
    assert summary["ok"] == 102 and summary["non_200"] == 1 and summary["errors"] == 2
    assert summary["achieved_rps"] == round(102 / 4.0, 1)
    assert summary["p99_ms"] > 100  # the slow window's tail is not averaged away
