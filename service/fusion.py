"""Transition fusion: the model's beam fused with the last history item's most frequent successors.

The generative model and the item-to-item transition table are right on different users (on
Scientific the model ranked the target first for users the table missed, and the other way round),
so the served ranking fuses the two lists by reciprocal rank: an item scores

    1 / (RANK_OFFSET + its rank in the beam) + weight / (RANK_OFFSET + its rank among the successors)

(a list it is not in adds nothing), best first; ties keep the beam's order, then the successors'.
The weight is chosen by the pipeline on validation (0: the beam alone, no fusion) and kept in the
manifest; the successor lists come from the training split and sit in the bundle as two arrays:
`transition_offsets.npy` (N + 1,) and `transition_successors.npy`, item i's successors, most
frequent first, at `successors[offsets[i]:offsets[i + 1]]`. numpy only: training evaluates with
this same code, so the served ranking is the evaluated one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RANK_OFFSET = 10  # the usual reciprocal-rank-fusion constant: the first ranks matter, not only rank 1
OFFSETS_FILE = "transition_offsets.npy"
SUCCESSORS_FILE = "transition_successors.npy"


@dataclass(frozen=True)
class TransitionFusion:
    offsets: np.ndarray  # (N + 1,) int64
    successors: np.ndarray  # (E,) int64 item indices
    weight: float

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 or (np.diff(self.offsets) < 0).any():
            raise ValueError("transition offsets must start at 0 and never decrease")
        if self.offsets[-1] != len(self.successors):
            raise ValueError(f"transition offsets end at {self.offsets[-1]}, but there are {len(self.successors)} successors")
        if len(self.successors) and (self.successors.min() < 0 or self.successors.max() >= len(self.offsets) - 1):
            raise ValueError(f"transition successors must be item indices in [0, {len(self.offsets) - 1})")
        if not np.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"the fusion weight must be a positive number, got {self.weight!r}")

    def successors_of(self, item: int) -> np.ndarray:
        """Item `item`'s successors, most frequent first; none for an item the table does not hold
        (one added after training)."""
        if not 0 <= item < len(self.offsets) - 1:
            return self.successors[:0]
        return self.successors[self.offsets[item] : self.offsets[item + 1]]

    def fuse(self, beam_items: np.ndarray, last_item: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One request: its beam (item indices best first, -1 for none) and the newest history item ->
        (items, fused scores), best first. `allowed` (N,) bool keeps the successors a constraint allows."""
        successors = self.successors_of(last_item)
        if allowed is not None:
            successors = successors[allowed[successors]]
        return fuse_ranked(beam_items, successors, self.weight)


def fuse_ranked(beam_items: np.ndarray, successors: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal-rank fusion of two rankings (see the module docstring). -> (items, scores), best first."""
    scores: dict[int, float] = {}
    for rank, item in enumerate(int(i) for i in beam_items if i >= 0):
        if item not in scores:  # a repeated item keeps its first rank
            scores[item] = 1.0 / (RANK_OFFSET + rank)
    for rank, item in enumerate(int(i) for i in successors):
        scores[item] = scores.get(item, 0.0) + weight / (RANK_OFFSET + rank)
    items = np.fromiter(scores, dtype=np.int64, count=len(scores))
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    order = np.argsort(-values, kind="stable")  # ties: beam order, then the successors'
    return items[order], values[order]


def fuse_rankings(beam_items: np.ndarray, last_items: np.ndarray, fusion: TransitionFusion, k: int) -> np.ndarray:
    """Many requests at once (offline evaluation): (U, beam) beams and (U,) newest items -> (U, k)
    fused rankings, -1 where fewer than k items."""
    out = np.full((len(beam_items), k), -1, dtype=np.int64)
    for row, (beam, last) in enumerate(zip(beam_items, last_items)):
        items, _ = fusion.fuse(beam, int(last))
        out[row, : min(k, len(items))] = items[:k]
    return out


def save_fusion(bundle_dir: Path | str, fusion: TransitionFusion) -> dict[str, object]:
    """Writes the successor lists into a bundle (readable by a serving process of another uid);
    -> the manifest's `fusion` entry that load_fusion reads back."""
    path = Path(bundle_dir)
    np.save(path / OFFSETS_FILE, fusion.offsets.astype(np.int64))
    np.save(path / SUCCESSORS_FILE, fusion.successors.astype(np.int32))
    for name in (OFFSETS_FILE, SUCCESSORS_FILE):
        (path / name).chmod(0o644)
    return {"kind": "transitions", "weight": fusion.weight}


def load_fusion(bundle_dir: Path | str, weight: float) -> TransitionFusion:
    """The bundle's successor lists with the manifest's weight (arrays read without pickles)."""
    path = Path(bundle_dir)
    offsets = np.load(path / OFFSETS_FILE, allow_pickle=False).astype(np.int64, copy=False)
    successors = np.load(path / SUCCESSORS_FILE, allow_pickle=False).astype(np.int64, copy=False)
    return TransitionFusion(offsets, successors, float(weight))
