"""The one training loop: epochs in phases, extra losses switched on per phase, the best checkpoint on
validation NDCG@10, a time budget, and DistributedDataParallel under `torchrun`.

A task (the generative recommender in training/train.py, SASRec in training/sasrec.py) says what
a batch is, what the loss is and how to validate; the loop owns everything else. Joint training
(a tokenizer that keeps learning beside the recommender) plugs in through the same parts:
- `Objective.parts`: modules trained beside the main one (a tokenizer), inside the DDP wrapper so
  their gradients are all-reduced like the recommender's;
- `ExtraLoss`: a weighted loss over the main module's intermediate states and the parts, computed
  inside the wrapped forward (DDP must see every parameter a loss touches);
- `Phase`: which parameter groups step and which extra losses count, for how many epochs;
- `TrainingTask.after_epoch`: e.g. re-encode the catalog when a phase trained the tokenizer.
Runs unchanged under `torchrun` (gloo on CPU, nccl on CUDA): each rank takes its share of every
batch, rank 0 evaluates and decides when to stop, and its best checkpoint is every rank's.
"""
from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from training.optim import adamw, bf16_autocast_is_fast, warmup_cosine


# ---- distributed -----------------------------------------------------------------------------

def distributed_context() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def stop_together(stop: bool, world: int, device: torch.device) -> bool:
    """Rank 0 decides, so every rank leaves the loop at the same epoch."""
    if world == 1:
        return stop
    flag = torch.tensor([int(stop)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def broadcast_from_rank0(value: Any, world: int) -> Any:
    """Rank 0's `value` on every rank (any picklable object; used for codes and checkpoints)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


# ---- configuration ---------------------------------------------------------------------------

@dataclass
class LoopConfig:
    epochs: int
    patience: int  # evaluations without a better validation NDCG@10 before stopping
    min_epochs: int = 0  # no early stop before this epoch
    eval_every: int = 1  # epochs
    max_train_seconds: float | None = None
    # Re-plan the epoch count after each epoch so it fits the time budget at the pace so far, and
    # warm-up/cosine schedules finish their decay inside it instead of being cut off.
    plan_to_budget: bool = False
    grad_clip: float | None = None  # max gradient norm over the stepped groups' parameters
    bf16: bool = True  # autocast where it is fast (optim.bf16_autocast_is_fast)
    device: str = "cpu"


@dataclass
class ParamGroup:
    """Parameters with their own AdamW and schedule; a phase names the groups it steps."""
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: constant learning rate; else warm-up, cosine to the plan's end


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int | None = None  # None: until the loop stops
    train: tuple[str, ...] = ("recommender",)  # parameter groups stepped in this phase
    losses: tuple[str, ...] = ()  # extra losses that count in this phase


SINGLE_PHASE = (Phase("recommender"),)


def phase_at(phases: Sequence[Phase], epoch: int) -> Phase:
    """The phase that epoch `epoch` (1-based) belongs to; the last phase runs on past its epochs."""
    end = 0
    for phase in phases:
        if phase.epochs is None:
            return phase
        end += phase.epochs
        if epoch <= end:
            return phase
    return phases[-1]


class ExtraLoss(nn.Module):
    """A loss added, times `weight`, to the main loss while a phase names it. `states` are the main
    module's intermediate tensors for the batch (its forward with `with_states=True`), `parts` the
    objective's other modules (e.g. the tokenizer). Any adapters it owns are its own parameters."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, states: dict[str, torch.Tensor], parts: nn.ModuleDict) -> torch.Tensor:
        raise NotImplementedError


class Objective(nn.Module):
    """What the loop trains (and wraps in DDP): the main module's loss plus the active extra losses.
    main(*inputs) -> (loss, targets); with extra losses on, main(*inputs, with_states=True) ->
    (loss, targets, states)."""

    def __init__(self, main: nn.Module, parts: dict[str, nn.Module] | None = None,
                 extra_losses: dict[str, ExtraLoss] | None = None) -> None:
        super().__init__()
        self.main = main
        self.parts = nn.ModuleDict(parts or {})
        self.extra_losses = nn.ModuleDict(extra_losses or {})
        self.active: tuple[str, ...] = ()
        self.last_terms: dict[str, float] = {}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not self.active:
            return self.main(*inputs)
        loss, n_targets, states = self.main(*inputs, with_states=True)
        terms = {name: self.extra_losses[name](states, self.parts) for name in self.active}
        self.last_terms = {name: float(term.detach()) for name, term in terms.items()}
        for name, term in terms.items():
            loss = loss + self.extra_losses[name].weight * term
        return loss, n_targets


class TrainingTask(Protocol):
    objective: Objective
    param_groups: list[ParamGroup]
    steps_per_epoch: int  # optimizer steps in one epoch, for the schedules

    def batches(self, rng: np.random.Generator) -> list[list[int]]: ...

    def inputs(self, batch: list[int], rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """The objective's inputs for this rank's share of `batch`; None skips the batch (every rank must agree)."""

    def validate(self) -> dict[str, float]: ...  # rank 0 only

    def after_epoch(self, epoch: int, phase: Phase) -> dict[str, Any] | None:
        """Every rank; figures to add to the epoch's curve point (e.g. how many codes changed)."""

    def snapshot(self) -> dict[str, Any]: ...  # what the best checkpoint holds (copied)

    def restore(self, snapshot: dict[str, Any]) -> None: ...


class BestOnValidation:
    """The task's best snapshot by validation NDCG@10 so far, and evaluations since it improved.
    Only rank 0 evaluates; restore() hands its best snapshot to every rank."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {"ndcg@10": -1.0}
        self.epoch = -1
        self.evals_since = 0
        self._state: dict[str, Any] | None = None

    def update(self, snapshot: Callable[[], dict[str, Any]], valid: dict[str, float], epoch: int) -> None:
        if valid["ndcg@10"] > self.metrics["ndcg@10"]:
            self.metrics, self.epoch, self.evals_since = valid, epoch, 0
            self._state = copy.deepcopy(snapshot())
        else:
            self.evals_since += 1

    def restore(self, restore: Callable[[dict[str, Any]], None], world: int) -> None:
        state = broadcast_from_rank0(self._state, world)
        if state is not None:
            restore(state)


def plan_epochs(cfg, elapsed_s: float, epochs_done: int, world: int, device: torch.device) -> int:
    """Epochs that fit cfg.max_train_seconds at the pace so far (validation included), at most
    cfg.epochs, at least those done. Re-planned every epoch, so a machine that gets busier
    shortens the plan. Rank 0's plan is every rank's: the schedules must match for the replicas
    to stay in sync."""
    per_epoch = max(elapsed_s, 1e-6) / max(1, epochs_done)
    fits = epochs_done + int(max(0.0, cfg.max_train_seconds - elapsed_s) / per_epoch)
    plan = torch.tensor([max(epochs_done, 1, min(cfg.epochs, fits))], device=device)
    if world > 1:
        dist.broadcast(plan, 0)
    return int(plan.item())


@dataclass
class LoopResult:
    best_valid: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_seconds: float  # the whole loop, validation included
    step_seconds: float  # training passes only
    samples: int  # targets trained on, all ranks
    curve: list[dict] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.train_seconds, 1e-9)


def run_loop(
    task: TrainingTask,
    cfg: LoopConfig,
    rng: np.random.Generator,
    phases: Sequence[Phase] = SINGLE_PHASE,
    curve_path: Path | None = None,
    progress: bool = True,
) -> LoopResult:
    """Trains `task` and leaves it restored to its best snapshot."""
    rank, world = distributed_context()
    device = torch.device(cfg.device)
    objective = task.objective
    trained: nn.Module = objective
    if world > 1:  # with parts or extra losses, a phase may leave some parameters without gradients
        unused = len(objective.parts) > 0 or len(objective.extra_losses) > 0
        trained = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=unused)
    groups = {group.name: group for group in task.param_groups}
    for phase in phases:
        unknown = set(phase.train) - set(groups) or set(phase.losses) - set(objective.extra_losses)
        if unknown:
            raise ValueError(f"phase {phase.name!r} names unknown parameter groups or losses {sorted(unknown)}")
    optimizers = {name: adamw(g.params, g.lr, g.weight_decay, device) for name, g in groups.items()}
    planned_epochs = cfg.epochs  # a time budget shortens the plan after each epoch
    schedulers = {}
    for name, group in groups.items():
        if group.warmup_steps is not None:
            warmup = group.warmup_steps
            schedule = lambda step, w=warmup: warmup_cosine(step, w, task.steps_per_epoch * planned_epochs)  # noqa: E731
            schedulers[name] = torch.optim.lr_scheduler.LambdaLR(optimizers[name], schedule)
    use_bf16 = cfg.bf16 and bf16_autocast_is_fast(device)
    best, curve = BestOnValidation(), []
    samples, step, step_seconds, started = 0, 0, 0.0, time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        phase = phase_at(phases, epoch)
        objective.active = phase.losses
        if world == 1:  # no backward through groups this phase does not step (DDP needs fixed requires_grad)
            for name, group in groups.items():
                for p in group.params:
                    p.requires_grad_(name in phase.train)
        stepped = [optimizers[name] for name in phase.train]
        clipped = [p for name in phase.train for p in groups[name].params]
        objective.train()
        t0 = time.perf_counter()
        # disable=None: the bar only on a terminal, so a run's log file keeps the epoch lines alone.
        bar = tqdm(task.batches(rng), desc=f"epoch {epoch}", disable=None if progress and rank == 0 else True, leave=False)
        epoch_loss, epoch_targets, term_sums = 0.0, 0, dict.fromkeys(phase.losses, 0.0)
        for batch in bar:
            inputs = task.inputs(batch, rank, world, device)
            if inputs is None:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, n_targets = trained(*inputs)
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(clipped, cfg.grad_clip)
            for name, optimizer in zip(phase.train, stepped):
                optimizer.step()
                if name in schedulers:
                    schedulers[name].step()
            step += 1
            samples += n_targets * world
            epoch_loss += loss.item() * n_targets
            epoch_targets += n_targets
            for name in phase.losses:
                term_sums[name] += objective.last_terms[name] * n_targets
            bar.set_postfix(loss=f"{loss.item():.3f}")
        step_seconds += time.perf_counter() - t0
        after = task.after_epoch(epoch, phase) or {}
        elapsed = time.perf_counter() - started
        point = {"epoch": epoch, "phase": phase.name, "step": step, "train_loss": epoch_loss / max(1, epoch_targets),
                 **{f"{name}_loss": total / max(1, epoch_targets) for name, total in term_sums.items()}, **after,
                 "epoch_s": round(time.perf_counter() - t0, 2), "elapsed_s": round(elapsed, 1)}
        out_of_time = cfg.max_train_seconds is not None and elapsed > cfg.max_train_seconds
        if rank == 0 and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time):
            valid = task.validate()
            point.update({f"valid_{k}": v for k, v in valid.items()})
            best.update(task.snapshot, valid, epoch)
            if progress:
                print(json.dumps(point), flush=True)
        curve.append(point)
        if curve_path is not None and rank == 0:
            with curve_path.open("a") as f:
                f.write(json.dumps(point) + "\n")
        if cfg.plan_to_budget and cfg.max_train_seconds is not None:  # validation time counts toward the pace
            planned_epochs = plan_epochs(cfg, time.perf_counter() - started, epoch, world, device)
        stop = out_of_time or epoch >= planned_epochs or (best.evals_since >= cfg.patience and epoch >= cfg.min_epochs)
        if stop_together(stop, world, device):
            break
    train_seconds = time.perf_counter() - started
    for group in groups.values():
        for p in group.params:
            p.requires_grad_(True)
    best.restore(task.restore, world)
    objective.eval()
    return LoopResult(best_valid=best.metrics, best_epoch=best.epoch, epochs_run=epoch, train_seconds=train_seconds,
                      step_seconds=step_seconds, samples=samples, curve=curve)
