"""Configurations derived from a dataset's statistics, for catalogs genrec has never seen.

`derived_config` sizes the best measured recipe (collaborative codes, item head, warm-started code
embeddings: training/configs.py) to the data: the history window from how long histories are, the
batch from the number of training sequences (so an epoch is a few hundred optimizer steps), the
model width and codebook size from the catalog, epochs until validation stops improving with a
wall-clock cap as a guard, and SASRec's window and dropout the same way. Nothing reads the
dataset's name. `tune` tries a few variants of it within a time budget and keeps the one with the
best validation NDCG@10 (test figures are reported, never used to choose).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.configs import PipelineConfig
from training.data import Dataset
from training.model import Seq2SeqConfig
from training.train import TrainConfig

PROTOCOL_HISTORY = 20  # the evaluation protocol's window for the rows that compare with papers
MAX_HISTORY_CAP = 200
STEPS_PER_EPOCH = 200  # batch size is chosen so an epoch is about this many optimizer steps


@dataclass(frozen=True)
class DataShape:
    n_users: int
    n_items: int
    n_interactions: int
    history_median: float  # items per user
    history_p90: float

    @classmethod
    def of(cls, dataset: Dataset) -> DataShape:
        lengths = np.array([len(s) for s in dataset.sequences], dtype=np.float64)
        return cls(dataset.n_users, dataset.n_items, dataset.n_interactions,
                   float(np.median(lengths)), float(np.percentile(lengths, 90)))

    @property
    def interactions_per_item(self) -> float:
        return self.n_interactions / max(1, self.n_items)


def _power_of_two(x: float, low: int, high: int) -> int:
    return int(min(high, max(low, 2 ** round(math.log2(max(x, 1.0))))))


def derived_config(dataset: str, shape: DataShape, max_train_seconds: float = 3 * 3600.0) -> PipelineConfig:
    """The pipeline configuration for a dataset of this shape (dataset: its folder)."""
    # Most users' whole history (the 90th percentile), at least the protocol's 20.
    max_history = int(min(MAX_HISTORY_CAP, max(PROTOCOL_HISTORY, math.ceil(shape.history_p90))))
    batch_size = _power_of_two(shape.n_users / STEPS_PER_EPOCH, 16, 256)
    steps_per_epoch = math.ceil(shape.n_users / batch_size)
    d_model = 64 if shape.n_items < 3000 else 128 if shape.n_items < 50_000 else 256
    # About sqrt(N) codes per level: the first code splits the catalog into groups of ~sqrt(N) items.
    codebook_size = _power_of_two(math.sqrt(shape.n_items), 16, 256)
    # The decoder's cross-attention carries no position: over a long window it cannot tell the newest
    # item from the others, so its first input is the encoder's newest state.
    model = Seq2SeqConfig(d_model=d_model, n_heads=max(2, d_model // 32), d_ff=4 * d_model, max_history=max_history,
                          history_item_ids=True, item_head=True,
                          decoder_start_from_history=max_history > PROTOCOL_HISTORY)
    # Every position of a sequence is a target, so a step's gradient averages batch x history
    # targets: the learning rate grows with their square root from 1e-3 at 256, within [5e-4, 2e-3].
    targets_per_step = batch_size * min(shape.history_median, max_history)
    lr = float(np.clip(1e-3 * math.sqrt(targets_per_step / 256), 5e-4, 2e-3))
    train = TrainConfig(
        epochs=200, batch_size=batch_size, lr=lr, warmup_steps=min(500, steps_per_epoch),
        patience=4, min_epochs=5, eval_every=1, eval_users=min(4000, shape.n_users),
        max_train_seconds=max_train_seconds, max_sequence_items=max(64, max_history + 1),
        init_codes_from_features=True)
    sasrec = {"max_len": max_history, "dropout": 0.5 if shape.interactions_per_item < 12 else 0.3,
              "batch_size": _power_of_two(shape.n_users / STEPS_PER_EPOCH, 32, 256)}
    return PipelineConfig(
        name=f"derived-{Path(dataset).name}", dataset=dataset, tokenizer="rqkmeans", item_features="collaborative",
        tokenizer_params={"levels": 3, "codebook_size": codebook_size}, model=model, train=train, sasrec=sasrec,
        choose_item_head_candidates=True, choose_transition_fusion=True)


def tune_candidates(base: PipelineConfig) -> dict[str, PipelineConfig]:
    """A few variants of the derived configuration that the data's statistics cannot decide between."""
    wider = dataclasses.replace(base.model, d_model=2 * base.model.d_model, n_heads=2 * base.model.n_heads,
                                d_ff=2 * base.model.d_ff)
    return {
        "derived": base,
        "wider": dataclasses.replace(base, model=wider),
        "half-lr": dataclasses.replace(base, train=dataclasses.replace(base.train, lr=base.train.lr / 2)),
    }


def tune(base: PipelineConfig, budget_minutes: float, seed: int = 0, models_dir: Path | None = None,
         progress: bool = True) -> dict[str, Any]:
    """Runs each candidate with an equal share of the budget's training time and picks the best by
    validation NDCG@10. Shared inputs (embeddings, SASRec) are computed first and count against
    the budget."""
    from training.pipeline import REPO_ROOT, prepare_shared_inputs, run_pipeline

    started = time.perf_counter()
    prepare_shared_inputs(base, progress)
    candidates = tune_candidates(base)
    left = budget_minutes * 60 - (time.perf_counter() - started)
    share = max(30.0, left / len(candidates) * 0.8)  # evaluation and export take the rest
    rows: dict[str, dict[str, Any]] = {}
    for name, cfg in candidates.items():
        cfg = dataclasses.replace(cfg, name=f"{base.name}-{name}",
                                  train=dataclasses.replace(cfg.train, max_train_seconds=share))
        summary = run_pipeline(cfg, seed=seed, models_dir=models_dir or REPO_ROOT / "models", progress=progress)
        rows[name] = {"valid": summary["valid"], "test": summary["test"], "bundle": summary["bundle"],
                      "epochs_run": summary["epochs_run"], "config": cfg.to_dict()}
    chosen = max(rows, key=lambda name: rows[name]["valid"]["ndcg@10"])
    return {"chosen": chosen, "bundle": rows[chosen]["bundle"], "train_seconds_each": round(share, 1),
            "wall_s": round(time.perf_counter() - started, 1), "rows": rows}


def tune_table(result: dict[str, Any]) -> str:
    lines = ["| candidate | valid R@10 | valid N@10 | test R@10 | test N@10 | epochs |", "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        mark = " (chosen)" if name == result["chosen"] else ""
        lines.append(f"| {name}{mark} | {row['valid']['recall@10']:.4f} | {row['valid']['ndcg@10']:.4f} | "
                     f"{row['test']['recall@10']:.4f} | {row['test']['ndcg@10']:.4f} | {row['epochs_run']} |")
    return "\n".join(lines)


def describe(shape: DataShape, cfg: PipelineConfig) -> str:
    picked = {"max_history": cfg.model.max_history, "batch_size": cfg.train.batch_size, "lr": round(cfg.train.lr, 6),
              "d_model": cfg.model.d_model, "codebook_size": cfg.tokenizer_params["codebook_size"], "sasrec": cfg.sasrec}
    return json.dumps({"data": dataclasses.asdict(shape), "derived": picked})
