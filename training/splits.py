"""The new-item split: ~5% of the items, stratified by popularity, held out of every training
sequence and of tokenizer and SASRec fitting; at test time they are in the catalog with codes from
their text only. Test users split by whether their target is a held-out item, and by the target's
training popularity (long tail: <= 5 training interactions).

Built on the leave-one-out protocol (training/data.py): the same targets, with held-out items
removed from every training sequence and history. Users whose validation target is held out are
not validated on; users whose history is empty once held-out items are removed are not evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data import Dataset, Splits, item_popularity, leave_one_out
from training.metrics import topk_metrics

LONG_TAIL_MAX = 5  # training interactions of a long-tail target
STRATA = 20  # popularity strata the held-out items are drawn from, equally


@dataclass(frozen=True)
class NewItemSplit:
    held_out: np.ndarray  # (K,) sorted item indices no training sequence contains
    splits: Splits  # training sequences (all users, held-out items removed); valid_* and test_* of the evaluable users
    valid_users: np.ndarray  # dataset user index of each validation row
    test_users: np.ndarray  # dataset user index of each test row
    train_counts: np.ndarray  # (N,) training interactions per item after the removal (0 for held-out items)

    @property
    def known_items(self) -> np.ndarray:
        """Items the tokenizer and the recommender may learn from: every item not held out."""
        return np.setdiff1d(np.arange(len(self.train_counts)), self.held_out)

    def is_new(self, items: np.ndarray) -> np.ndarray:
        return np.isin(items, self.held_out)

    def test_groups(self) -> dict[str, np.ndarray]:
        """Boolean masks over the test rows: every user, held-out (new) targets, the rest, and the
        rest by the target's training interactions."""
        targets = self.splits.test_targets
        new = self.is_new(targets)
        by_popularity = popularity_groups(targets, self.train_counts)
        return {"all": by_popularity.pop("all"), "new_target": new, "known_target": ~new,
                **{name: rows & ~new for name, rows in by_popularity.items()}}


def popularity_groups(targets: np.ndarray, train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over rows by the target's training interactions: every row, the long tail
    (<= LONG_TAIL_MAX), 6-20 and > 20."""
    counts = np.asarray(train_counts)[np.asarray(targets)]
    return {"all": np.ones(len(counts), dtype=bool), f"tail<={LONG_TAIL_MAX}": counts <= LONG_TAIL_MAX,
            "6-20": (counts > LONG_TAIL_MAX) & (counts <= 20), ">20": counts > 20}


def by_target_popularity(ranked: np.ndarray, targets: np.ndarray, train_sequences: list[np.ndarray],
                         n_items: int) -> dict[str, dict[str, float]]:
    """Test figures of (U, >= 10) rankings by the target's training interactions (popularity_groups)."""
    targets = np.asarray(targets)
    return group_metrics(ranked, targets, popularity_groups(targets, item_popularity(train_sequences, n_items)))


def stratified_held_out(popularity: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Items ordered by popularity (ties in random order) cut into STRATA equal groups; the same
    share `fraction` drawn from each, so head and tail are held out alike. -> sorted indices."""
    n = len(popularity)
    order = np.lexsort((rng.permutation(n), popularity))
    total, chosen, start = int(round(fraction * n)), [], 0
    for stratum in np.array_split(order, min(STRATA, n)):
        end = start + len(stratum)  # each stratum's share of the total, rounded so the shares add up
        take = int(round(total * end / n)) - int(round(total * start / n))
        chosen.append(rng.choice(stratum, take, replace=False))
        start = end
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def new_item_split(dataset: Dataset, max_history: int = 20, fraction: float = 0.05, seed: int = 0) -> NewItemSplit:
    """Holds out `fraction` of the items (stratified by leave-one-out training popularity) and
    removes them from every training sequence and history; their only appearances are as test
    targets (and never as validation targets)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    base = leave_one_out(dataset, max_history)
    held_out = stratified_held_out(item_popularity(base.train_sequences, dataset.n_items), fraction,
                                   np.random.default_rng(seed))
    new = np.zeros(dataset.n_items, dtype=bool)
    new[held_out] = True

    def known(items: np.ndarray) -> np.ndarray:
        return items[~new[items]]

    train, valid_h, valid_t, valid_u, test_h, test_t, test_u = [], [], [], [], [], [], []
    for user, sequence in enumerate(dataset.sequences):
        sequence = np.asarray(sequence, dtype=np.int64)
        n = len(sequence)
        train.append(known(sequence[: n - 2]))
        history = known(sequence[: n - 2])[-max_history:]
        if len(history) and not new[sequence[n - 2]]:
            valid_h.append(history)
            valid_t.append(sequence[n - 2])
            valid_u.append(user)
        history = known(sequence[: n - 1])[-max_history:]
        if len(history):
            test_h.append(history)
            test_t.append(sequence[n - 1])
            test_u.append(user)
    splits = Splits(train, valid_h, np.asarray(valid_t, dtype=np.int64), test_h, np.asarray(test_t, dtype=np.int64),
                    max_history)
    return NewItemSplit(held_out, splits, np.asarray(valid_u, dtype=np.int64), np.asarray(test_u, dtype=np.int64),
                        item_popularity(train, dataset.n_items))


def group_metrics(ranked: np.ndarray, targets: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Recall/NDCG@5,10 of (U, >= 10) rankings per group of rows, with the group's user count."""
    out = {}
    for name, rows in groups.items():
        metrics = topk_metrics(ranked[rows], targets[rows]) if rows.any() else dict.fromkeys(
            ("recall@5", "ndcg@5", "recall@10", "ndcg@10"))  # an empty group has no figures (JSON null)
        out[name] = {**metrics, "users": int(rows.sum())}
    return out


def content_knn(text_embeddings: np.ndarray, histories: list[np.ndarray], k: int = 10, batch: int = 1024) -> np.ndarray:
    """The floor that can reach a new item: the k items whose text embedding is closest (cosine)
    to the last history item's, the item itself excluded. -> (U, k)."""
    x = text_embeddings / np.maximum(np.linalg.norm(text_embeddings, axis=1, keepdims=True), 1e-12)
    last = np.array([int(h[-1]) for h in histories], dtype=np.int64)
    out = np.empty((len(histories), k), dtype=np.int64)
    for start in range(0, len(last), batch):
        rows = last[start : start + batch]
        similarity = x[rows] @ x.T  # (b, N)
        similarity[np.arange(len(rows)), rows] = -np.inf
        top = np.argpartition(-similarity, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, 1), axis=1, kind="stable")
        out[start : start + batch] = np.take_along_axis(top, order, 1)
    return out


NEW_ITEM_SHARE = 0.1  # TIGER's cold-start setting: at most this share of the top k may be new items


def with_new_items_by_prefix(ranked: np.ndarray, semantic_ids: np.ndarray, new_items: np.ndarray,
                             share: float = NEW_ITEM_SHARE, k: int = 10, min_shared_levels: int = 2) -> np.ndarray:
    """TIGER's cold-start retrieval over a generative ranking: a model trained on known items gives a
    new item's own last codes almost no probability, but its code prefix places it near the items it
    resembles. Each ranked item brings the new items sharing its deepest code prefix (at least
    `min_shared_levels` levels, the collision level excluded), placed right after it; at most
    floor(share * k) new items enter the top k. ranked: (U, >= k), -1 for empty slots. -> (U, k)."""
    ids = np.asarray(semantic_ids)
    content_levels = ids.shape[1] - 1  # the last level only tells items with equal codes apart
    allowed = int(share * k)
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for item in np.asarray(new_items).tolist():
        for depth in range(min_shared_levels, content_levels + 1):
            by_prefix.setdefault(tuple(ids[item, :depth].tolist()), []).append(item)
    out = np.full((len(ranked), k), -1, dtype=np.int64)
    for row, items in enumerate(np.asarray(ranked).tolist()):
        chosen: list[int] = []
        added = 0
        for item in items:
            if len(chosen) >= k:
                break
            if item < 0:
                continue
            if item not in chosen:
                chosen.append(item)
            matches: list[int] = []
            for depth in range(content_levels, min_shared_levels - 1, -1):
                matches = [n for n in by_prefix.get(tuple(ids[item, :depth].tolist()), []) if n not in chosen]
                if matches:
                    break
            for new in matches:
                if added >= allowed or len(chosen) >= k:
                    break
                chosen.append(new)
                added += 1
        out[row, : len(chosen[:k])] = chosen[:k]
    return out


def markdown_table(rows: dict[str, dict[str, dict[str, float]]], metric_keys: tuple[str, ...] = ("recall@10", "ndcg@10")) -> str:
    """{row: group_metrics(...)} -> one line per row, R@10/N@10 per group; user counts in the header."""
    groups = list(next(iter(rows.values())))
    first = next(iter(rows.values()))
    header = "| row | " + " | ".join(f"{g} (n={first[g]['users']}) {k.replace('recall', 'R').replace('ndcg', 'N')}"
                                     for g in groups for k in metric_keys) + " |"
    lines = [header, "|---|" + "---|" * (len(groups) * len(metric_keys))]
    for name, by_group in rows.items():
        lines.append(f"| {name} | " + " | ".join("-" if by_group[g][k] is None else f"{by_group[g][k]:.4f}"
                                                 for g in groups for k in metric_keys) + " |")
    return "\n".join(lines)


def new_item_rows(
    split: NewItemSplit,
    model_rankings: dict[str, np.ndarray],
    text_embeddings: np.ndarray | None,
    rows: np.ndarray | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """The test rows of the split, by group: each model ranking given ((U, >= 10) over the test
    rows, named by how the new items got their codes) beside the floors counted on the same
    training sequences: most popular and last-item transitions (which never reach a new item) and
    content kNN of the last history item (MiniLM cosine; needs the text embeddings). `rows`: the
    test rows the model rankings are of (default all)."""
    from training.baselines import Floors

    rows = np.arange(len(split.splits.test_targets)) if rows is None else np.asarray(rows)
    histories, targets = [split.splits.test_histories[r] for r in rows], split.splits.test_targets[rows]
    groups = {name: mask[rows] for name, mask in split.test_groups().items()}
    floors = Floors.from_train(split.splits.train_sequences, len(split.train_counts))
    rankings = dict(model_rankings)
    if text_embeddings is not None:
        rankings["content kNN (last item, text cosine)"] = content_knn(text_embeddings, histories)
    rankings["most popular"] = floors.most_popular(histories)
    rankings["last-item transitions"] = floors.last_item_transitions(histories)
    return {name: group_metrics(ranked, targets, groups) for name, ranked in rankings.items()}


# Said beside every new-item table: the rows that are not there, and why.
CANNOT_RANK_NEW_ITEMS = ("SASRec and collaborative codes cannot rank a new item: its embedding (and so its codes) "
                         "comes from interactions it does not have; their new_target R@10 is 0 by construction.")
