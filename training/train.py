"""The generative recommender as a task of the training loop (training/loop.py): whole user sequences
per step, the checkpoint chosen on validation NDCG@10.

The catalog's codes live in a `CatalogCodes`; with a trainable tokenizer beside the recommender
(`tokenizer=`), a phase that steps the "tokenizer" group re-encodes the catalog after each of its
epochs: the training codes, the item head's code buffer and the validation trie follow, within
the collision level's fixed capacity. The best checkpoint holds recommender, tokenizer and codes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.batching import collate_sequences, sequence_batches
from training.evaluation import beam_ranker, evaluate
from training.loop import (
    SINGLE_PHASE, ExtraLoss, LoopConfig, Objective, ParamGroup, Phase, broadcast_from_rank0, distributed_context, run_loop,
)
from training.model_kinds import build_model
from training.tokenizers.base import CatalogCodes, CollisionOverflow, TrainableTokenizer
from training.warm_start import code_tables_from_features, warm_start_codes, warm_start_items


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 256  # user sequences per step
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    patience: int = 8  # evaluations without a better validation NDCG@10 before stopping
    min_epochs: int = 15  # the first epochs' validation is noise: no early stop before this
    eval_every: int = 1  # epochs
    eval_users: int | None = 4000  # validation users scored during training (None: all); final numbers use all
    beam_size: int = 20
    bf16: bool = True  # autocast where it is fast: GPUs, CPUs with native bf16 (optim.bf16_autocast_is_fast)
    max_train_seconds: float | None = None
    max_sequence_items: int = 64  # longer training sequences keep their most recent items
    # Start the code embeddings (and the output heads) from the item features the codes came from,
    # instead of noise: the sum of an item's code embeddings then begins as its projected feature.
    init_codes_from_features: bool = False
    tokenizer_lr: float = 1e-4  # a tokenizer trained beside the recommender (joint training only)
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    def loop_config(self) -> LoopConfig:
        return LoopConfig(epochs=self.epochs, patience=self.patience, min_epochs=self.min_epochs,
                          eval_every=self.eval_every, max_train_seconds=self.max_train_seconds, plan_to_budget=True,
                          grad_clip=1.0, bf16=self.bf16, device=self.device)


class RecommenderTask:
    """What the loop needs to train a generative recommender (and optionally its tokenizer)."""

    def __init__(self, model: nn.Module, codes: CatalogCodes, train_cfg: TrainConfig, sequences: list[np.ndarray],
                 eval_histories: list[np.ndarray], eval_targets: np.ndarray,
                 tokenizer: TrainableTokenizer | None = None, extra_losses: dict[str, ExtraLoss] | None = None) -> None:
        self.model, self.codes, self.cfg = model, codes, train_cfg
        self.sequences, self.eval_histories, self.eval_targets = sequences, eval_histories, eval_targets
        self.tokenizer = tokenizer
        self._rank, self._world = distributed_context()
        self._codes_tensor = torch.as_tensor(codes.semantic_ids, dtype=torch.long)
        parts = {"tokenizer": tokenizer.module} if tokenizer is not None else {}
        self.objective = Objective(model, parts, extra_losses)
        self.param_groups = [ParamGroup("recommender", list(model.parameters()), train_cfg.lr, train_cfg.weight_decay,
                                        warmup_steps=train_cfg.warmup_steps)]
        if tokenizer is not None:
            self.param_groups.append(ParamGroup("tokenizer", list(tokenizer.module.parameters()), train_cfg.tokenizer_lr))
        # Adapters of the extra losses train with the recommender.
        self.param_groups[0].params += [p for loss in (extra_losses or {}).values() for p in loss.parameters()]
        self.steps_per_epoch = math.ceil(len(sequences) / train_cfg.batch_size)

    def batches(self, rng: np.random.Generator) -> list[list[int]]:
        return sequence_batches(self.sequences, self.cfg.batch_size, rng)

    def inputs(self, batch: list[int], rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        shard = batch[rank::world] or batch[:1]  # a short last batch still gives every rank work
        item_codes, mask, items = collate_sequences([self.sequences[i] for i in shard], self._codes_tensor)
        return item_codes.to(device), mask.to(device), items.to(device)

    def validate(self) -> dict[str, float]:
        ranker = beam_ranker(self.model, self.codes.semantic_ids, self.cfg.beam_size, device=self.cfg.device)
        return evaluate(ranker, self.eval_histories, self.eval_targets)

    def after_epoch(self, epoch: int, phase: Phase) -> dict[str, Any] | None:
        if self.tokenizer is None or "tokenizer" not in phase.train:
            return None
        raw = self.tokenizer.encode_catalog(previous=self.codes.semantic_ids[:, :-1]) if self._rank == 0 else None
        return self.refresh_codes(broadcast_from_rank0(raw, self._world), epoch)

    def refresh_codes(self, raw: np.ndarray, epoch: int) -> dict[str, Any]:
        """New raw codes for every item after `epoch`; the figures for the curve."""
        before = self.codes.semantic_ids[:, :-1]
        try:
            self.set_codes(raw, refresh=True)
        except CollisionOverflow as overflow:  # keep the codes the model knows; say so in the curve
            print(f"[genrec] codes not refreshed after epoch {epoch}: {overflow}", flush=True)
            return {"codes_refreshed": False}
        return {"codes_refreshed": True, "items_recoded": float((raw != before).any(1).mean()),
                "collisions": self.codes.report.collisions_before_separation}

    def set_codes(self, codes: np.ndarray, refresh: bool) -> None:
        """New raw codes (refresh=True) or whole semantic IDs: training codes and item head follow."""
        if refresh:
            self.codes.refresh(codes)
        else:
            self.codes.semantic_ids = np.asarray(codes)
        self._codes_tensor = torch.as_tensor(self.codes.semantic_ids, dtype=torch.long)
        if self.model.cfg.item_head:
            self.model.set_item_codes(self.codes.semantic_ids)

    def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {"recommender": self.model.state_dict(), "semantic_ids": self.codes.semantic_ids}
        if self.tokenizer is not None:
            state["tokenizer"] = self.tokenizer.module.state_dict()
        return state

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.model.load_state_dict(snapshot["recommender"])
        if self.tokenizer is not None:
            self.tokenizer.module.load_state_dict(snapshot["tokenizer"])
        self.set_codes(snapshot["semantic_ids"], refresh=False)


@dataclass
class TrainResult:
    model: nn.Module
    codes: CatalogCodes  # the best checkpoint's codes
    best_valid: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_seconds: float
    samples_per_second: float
    curve: list[dict]


def train_recommender(
    model_cfg,
    train_cfg: TrainConfig,
    train_sequences: list[np.ndarray],
    valid_histories: list[np.ndarray],
    valid_targets: np.ndarray,
    codes: CatalogCodes,
    curve_path: Path | None = None,
    progress: bool = True,
    item_features: np.ndarray | None = None,
    model_kind: str = "seq2seq",
    tokenizer: TrainableTokenizer | None = None,
    phases: Sequence[Phase] = SINGLE_PHASE,
    extra_losses: dict[str, ExtraLoss] | None = None,
    task_type: type[RecommenderTask] | None = None,
    task_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """task_type/task_kwargs: a RecommenderTask subclass with its own inputs (STORE's task mix, training/store.py)."""
    if list(model_cfg.codebook_sizes) != codes.codebook_sizes:
        model_cfg = replace(model_cfg, codebook_sizes=codes.codebook_sizes)
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)  # same on every rank: same batch list, split by rank
    model = build_model(model_kind, model_cfg)
    semantic_ids = codes.semantic_ids
    if model_cfg.item_head:
        model.set_item_codes(semantic_ids)
    if train_cfg.init_codes_from_features:
        if item_features is None:
            raise ValueError("init_codes_from_features needs the item features the codes were fitted on")
        tables = code_tables_from_features(item_features, semantic_ids, model_cfg.codebook_sizes, model_cfg.d_model,
                                           train_cfg.seed)
        warm_start_codes(model, tables)
        if model.item_embeddings is not None:
            warm_start_items(model, item_features, semantic_ids, tables, train_cfg.seed)
    model = model.to(train_cfg.device)
    sequences = [s[-train_cfg.max_sequence_items :] for s in train_sequences if len(s) >= 2]

    eval_rows = np.arange(len(valid_histories))
    if train_cfg.eval_users and train_cfg.eval_users < len(eval_rows):
        eval_rows = np.sort(np.random.default_rng(train_cfg.seed + 1).choice(eval_rows, train_cfg.eval_users, replace=False))
    task = (task_type or RecommenderTask)(model, codes, train_cfg, sequences, [valid_histories[i] for i in eval_rows],
                                          np.asarray(valid_targets)[eval_rows], tokenizer, extra_losses,
                                          **(task_kwargs or {}))
    result = run_loop(task, train_cfg.loop_config(), rng, phases, curve_path, progress)
    return TrainResult(
        model=model,
        codes=codes,
        best_valid=result.best_valid,
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        train_seconds=result.train_seconds,
        samples_per_second=result.samples_per_second,
        curve=result.curve,
    )
