from collections import Counter, defaultdict

import numpy as np
import pytest

from training.data import load_dataset, make_synthetic_dataset, write_dataset
from training.shaped_data import long_histories, short_sessions


def _top_successor_share(sequences, order: int) -> float:
    """Share of next items that are the most frequent follower of the previous `order` items."""
    followers: dict[tuple, Counter] = defaultdict(Counter)
    for seq in sequences:
        for t in range(order, len(seq)):
            followers[tuple(seq[t - order:t])][int(seq[t])] += 1
    hits = sum(c.most_common(1)[0][1] for c in followers.values())
    return hits / sum(sum(c.values()) for c in followers.values())


def test_long_histories_are_long_and_need_more_than_the_last_item(tmp_path):
    data = long_histories(n_users=300, n_items=200, n_chains=60, chain_length=40, seed=1)
    lengths = [len(s) for s in data.sequences]
    assert min(lengths) >= 30 and data.n_items == 200
    # The last item is ambiguous, the last two mostly name the chain.
    assert _top_successor_share(data.sequences, 2) > 2 * _top_successor_share(data.sequences, 1)
    again = load_dataset(write_dataset(data, tmp_path / "long"))
    assert [list(s) for s in again.sequences] == [list(s) for s in data.sequences]


def test_short_sessions_keep_each_users_last_items_over_the_whole_catalog():
    source = make_synthetic_dataset(n_users=50, n_items=40, max_length=10)
    cut = short_sessions(source, keep_last=3)
    assert cut.n_items == source.n_items and cut.n_users == source.n_users
    for full, short in zip(source.sequences, cut.sequences):
        assert list(short) == list(full[-3:])
    with pytest.raises(ValueError, match="at least 3"):
        short_sessions(source, keep_last=2)
    assert np.all([len(s) <= 3 for s in cut.sequences])
