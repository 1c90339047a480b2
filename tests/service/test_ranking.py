from __future__ import annotations

import numpy as np

from service.routes.recommend import merge_with_popularity


def test_beam_first_then_popular_without_repeats_or_exclusions() -> None:
    beam_items = np.array([5, 3, -1, 5, 8])
    beam_scores = np.array([-1.0, -2.0, -np.inf, -3.0, -4.0])
    ranked, from_beam = merge_with_popularity(beam_items, beam_scores, [8, 1, 3, 2, 0], k=4, excluded={3})
    assert ranked == [(5, -1.0), (8, -4.0), (1, None), (2, None)]
    assert from_beam == 2


def test_stops_at_k_and_when_the_catalog_runs_out() -> None:
    ranked, from_beam = merge_with_popularity([1, 2, 3], [-1.0, -2.0, -3.0], [0, 1, 2, 3], k=2, excluded=set())
    assert ranked == [(1, -1.0), (2, -2.0)] and from_beam == 2
    ranked, from_beam = merge_with_popularity([], [], [0, 1, 2], k=10, excluded={1})
    assert ranked == [(0, None), (2, None)] and from_beam == 0
