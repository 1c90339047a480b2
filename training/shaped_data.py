"""Datasets of other shapes than Beauty and Scientific, to check that derived defaults hold there.

- `long_histories`: a small catalog and long histories with a known second-order structure. Items
  lie on many chains (random item orders); a user walks one chain, with some random detours. The
  last item alone is ambiguous (it lies on ~`chains_per_item` chains, each with its own successor),
  the last two items mostly name the chain: a sequence model can beat the transition table.
- `short_sessions`: a real dataset cut to each user's last few items over its whole catalog:
  short histories over a large catalog.

`python -m training.shaped_data --out data-shaped` writes both in the genrec folder format.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.data import Dataset, load_dataset, write_dataset

_WORDS = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kelp", "lumen", "maple", "nectar", "onyx", "pollen", "quartz", "russet", "sierra", "tundra"]


def long_histories(n_users: int = 2000, n_items: int = 600, n_chains: int = 240, chain_length: int = 50,
                   min_length: int = 30, max_length: int = 100, detour: float = 0.1, seed: int = 0) -> Dataset:
    """Users walking chains through a small catalog; see the module docstring."""
    rng = np.random.default_rng(seed)
    chains = [rng.choice(n_items, size=chain_length, replace=False) for _ in range(n_chains)]
    # An item's text names the chain it first appears on, so text codes carry some of the structure.
    home = np.full(n_items, -1)
    for c, chain in enumerate(chains):
        fresh = chain[home[chain] < 0]
        home[fresh] = c
    home[home < 0] = rng.integers(n_chains, size=int((home < 0).sum()))
    titles = [f"{_WORDS[i % len(_WORDS)]} {_WORDS[home[i] % len(_WORDS)]} no. {i}" for i in range(n_items)]
    texts = [f"{t}. series {home[i]}. line {home[i] % 17}" for i, t in enumerate(titles)]
    sequences = []
    for _ in range(n_users):
        chain = chains[rng.integers(n_chains)]
        pos = int(rng.integers(chain_length))
        length = int(rng.integers(min_length, max_length + 1))
        seq = []
        for _ in range(length):
            seq.append(int(rng.integers(n_items)) if rng.random() < detour else int(chain[pos % chain_length]))
            pos += 1
        sequences.append(np.asarray(seq, dtype=np.int64))
    return Dataset(name=f"long-histories-{n_users}x{n_items}", item_ids=[f"i{i}" for i in range(n_items)],
                   titles=titles, texts=texts, user_ids=[f"u{u}" for u in range(n_users)], sequences=sequences)


def short_sessions(source: Dataset, keep_last: int = 4) -> Dataset:
    """Each user's last `keep_last` items (the split needs at least 3), over the source's whole catalog."""
    if keep_last < 3:
        raise ValueError("keep_last must be at least 3: leave-one-out needs a train, a valid and a test item")
    sequences = [np.asarray(s[-keep_last:], dtype=np.int64) for s in source.sequences]
    return Dataset(name=f"{source.name}-last{keep_last}", item_ids=source.item_ids, titles=source.titles,
                   texts=source.texts, user_ids=source.user_ids, sequences=sequences, attributes=source.attributes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data-shaped", help="folder that receives one dataset folder per shape")
    parser.add_argument("--source", default="beauty", help="the real dataset short_sessions cuts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    for folder, dataset in [("long-histories", long_histories(seed=args.seed)),
                            (f"short-sessions-{args.source}", short_sessions(load_dataset(args.source)))]:
        write_dataset(dataset, out / folder)
        lengths = np.array([len(s) for s in dataset.sequences])
        print(f"{out / folder}: {dataset.n_users} users, {dataset.n_items} items, {dataset.n_interactions} "
              f"interactions, history median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}")


if __name__ == "__main__":
    main()
