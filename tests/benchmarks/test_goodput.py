"""Goodput: the most requests per second served with p99 within the budget, from (rate, p99) points,
and the stepping of the offered rate toward it."""
from __future__ import annotations

import math

import pytest
import serving_harness
from serving_harness import goodput, next_rate


def test_goodput_is_the_highest_rate_within_the_budget_when_p99_rises_with_the_rate():
    points = [(100.0, 12.0), (300.0, 20.0), (500.0, 49.9), (600.0, 50.0), (700.0, 80.0), (800.0, 400.0)]
    assert goodput(points) == 600.0  # the budget is inclusive
    assert goodput(points, budget_ms=30.0) == 300.0


def test_a_window_over_the_budget_below_one_within_it_does_not_cap_goodput():
    # a hiccup at 400 req/s; 500 req/s was served within the budget
    points = [(500.0, 45.0), (100.0, 10.0), (400.0, 75.0), (700.0, 90.0)]
    assert goodput(points) == 500.0


def test_no_point_within_the_budget_is_zero_goodput():
    assert goodput([(100.0, 60.0), (200.0, math.inf)]) == 0.0
    assert goodput([]) == 0.0


def test_a_window_with_unanswered_arrivals_is_over_the_budget_whatever_its_p99():
    full = {"p99_ms": 20.0, "ok": 300, "sent": 300}
    short = {"p99_ms": 20.0, "ok": 290, "sent": 300}
    empty = {"p99_ms": float("nan"), "ok": 0, "sent": 300}
    assert serving_harness.p99_or_miss(full) == 20.0
    assert serving_harness.p99_or_miss(short) == math.inf
    assert serving_harness.p99_or_miss(empty) == math.inf


@pytest.mark.parametrize(("points", "expected"), [
    ([(300.0, 20.0), (600.0, 80.0)], 450.0),  # halfway across the edge
    ([(300.0, 20.0), (450.0, 30.0), (600.0, 80.0)], 525.0),
    ([(300.0, 20.0), (600.0, 45.0)], 720.0),  # all within: grow past the highest
    ([(300.0, 70.0), (600.0, 90.0)], 150.0),  # none within: half the lowest
    ([(500.0, 45.0), (400.0, 75.0), (700.0, 90.0)], 600.0),  # above the highest within, not the hiccup below it
    ([(590.0, 45.0), (600.0, 80.0)], None),  # the edge is found to within 3%
])
def test_the_offered_rate_steps_toward_the_edge_of_the_budget(points, expected):
    rate = next_rate(points)
    assert rate == (pytest.approx(expected) if expected is not None else None)


def test_stepping_finds_the_edge_between_the_fractions_of_peak(monkeypatch):
    # A fake service whose p99 crosses 50 ms at 800 req/s: no real load, only the stepping rule.
    offered = []

    def fake_measure(svc, make, mode, rate, seconds, seed=0):
        offered.append(rate)
        return {"offered_rps": rate, "achieved_rps": rate, "p99_ms": 10.0 + 40.0 * rate / 800.0, "ok": 100, "sent": 100}

    monkeypatch.setattr(serving_harness, "measure", fake_measure)
    rate, rows = serving_harness.step_goodput(None, None, 1000.0, (0.3, 0.7, 1.0), 3, 1.0)
    assert offered == pytest.approx([300.0, 700.0, 1000.0, 850.0, 775.0, 812.5])
    assert rate == pytest.approx(775.0)
    assert [r["fraction_of_peak"] for r in rows[:3]] == [0.3, 0.7, 1.0]
