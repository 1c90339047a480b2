"""Training loop: whole user sequences per step, checkpoint chosen on validation NDCG@10.

Runs unchanged under `torchrun` (DistributedDataParallel, gloo on CPU, nccl on CUDA): each rank
takes its share of every batch list, and only rank 0 evaluates and keeps the best weights.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from service.trie import build_trie
from training.beam import ConstrainedBeamSearch, trie_tensors
from training.metrics import topk_metrics
from training.model import GenerativeRecommender, Seq2SeqConfig


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
    bf16: bool = True  # autocast where it is fast: GPUs, CPUs with native bf16 (bf16_autocast_is_fast)
    max_train_seconds: float | None = None
    max_sequence_items: int = 64  # longer training sequences keep their most recent items
    # Start the code embeddings (and the output heads) from the item features the codes came from,
    # instead of noise: the sum of an item's code embeddings then begins as its projected feature.
    init_codes_from_features: bool = False
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


# ---- batching --------------------------------------------------------------------------------

def pad_histories(
    histories: list[np.ndarray], semantic_ids: np.ndarray, max_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad the most recent `max_history` items -> codes (B, H, L) int64, mask (B, H) bool,
    items (B, H) int64 (padding = the catalog size, the item embeddings' padding row)."""
    width = max(1, min(max_history, max((len(h) for h in histories), default=1)))
    codes = np.zeros((len(histories), width, semantic_ids.shape[1]), dtype=np.int64)
    mask = np.zeros((len(histories), width), dtype=bool)
    items = np.full((len(histories), width), len(semantic_ids), dtype=np.int64)
    for row, history in enumerate(histories):
        recent = np.asarray(history[-width:], dtype=np.int64)
        if len(recent):
            codes[row, width - len(recent) :] = semantic_ids[recent]
            mask[row, width - len(recent) :] = True
            items[row, width - len(recent) :] = recent
    return codes, mask, items


def history_tensors(
    cfg: Seq2SeqConfig, codes: np.ndarray, mask: np.ndarray, items: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, ...]:
    """pad_histories' arrays -> the tensors the model's graphs take (cfg.history_inputs), in order."""
    arrays = {"history_codes": codes, "history_mask": mask, "history_items": items}
    return tuple(torch.as_tensor(arrays[name], device=device) for name in cfg.history_inputs)


def sequence_batches(sequences: list[np.ndarray], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar length, so padding stays small."""
    order = rng.permutation(len(sequences))
    chunk = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: len(sequences[i]))
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return batches


def collate_sequences(
    sequences: list[np.ndarray], semantic_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded item codes (B, T, L), mask (B, T) and item indices (B, T), padding = catalog size."""
    t = max(len(s) for s in sequences)
    items = torch.full((len(sequences), t), len(semantic_ids), dtype=torch.long)
    mask = torch.zeros(len(sequences), t, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        items[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = True
    return semantic_ids[items.masked_fill(~mask, 0)], mask, items


# ---- warm start ------------------------------------------------------------------------------

def project_features(features: np.ndarray, d_model: int, seed: int, item_rms: float = 0.04) -> np.ndarray:
    """(N, F) -> (N, d_model): the features' leading principal directions (random orthonormal ones
    when the features are narrower than d_model), scaled to `item_rms` per coordinate."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    if x.shape[1] >= d_model:
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        z = x @ vt[:d_model].T
    else:
        basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_model, x.shape[1])))
        z = x @ basis.T
    return z * (item_rms / max(float(np.sqrt((z**2).mean())), 1e-12))


def code_tables_from_features(
    features: np.ndarray, semantic_ids: np.ndarray, codebook_sizes: list[int], d_model: int, seed: int,
    item_rms: float = 0.04,
) -> list[np.ndarray]:
    """Per level a (V_l, d_model) table whose rows, summed along an item's codes, approximate the
    item's feature vector projected to d_model: level by level, each code's row is the mean of what
    the earlier levels left unexplained for its items (residual quantisation's centres, for any
    tokenizer, the collision level included). The projection keeps the features' leading principal
    directions (random orthonormal ones when the features are narrower than d_model); rows are
    scaled so an item's sum has `item_rms` per coordinate, about what random initialisation gives."""
    residual, tables = project_features(features, d_model, seed, item_rms), []
    for level, size in enumerate(codebook_sizes):
        codes = semantic_ids[:, level]
        sums = np.zeros((size, d_model))
        np.add.at(sums, codes, residual)
        counts = np.bincount(codes, minlength=size)[:, None]
        table = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        residual = residual - table[codes]
        tables.append(table.astype(np.float32))
    return tables


def warm_start_codes(model: GenerativeRecommender, tables: list[np.ndarray]) -> None:
    """Copies the tables into the code embeddings and the output heads (unused codes keep noise)."""
    with torch.no_grad():
        for level, table in enumerate(tables):
            rows = torch.as_tensor(table)
            used = rows.abs().sum(1) > 0
            for weight in (model.code_embeddings[level].weight, model.heads[level].weight):
                weight[used] = rows[used].to(weight.dtype)


def warm_start_items(model: GenerativeRecommender, features: np.ndarray, semantic_ids: np.ndarray,
                     tables: list[np.ndarray], seed: int) -> None:
    """Item embeddings start as what the code tables leave unexplained of each item's projected
    features, so an item's encoder input (codes' sum + its own row) begins as exactly that projection."""
    explained = sum(table[semantic_ids[:, level]] for level, table in enumerate(tables))
    residual = project_features(features, model.cfg.d_model, seed) - explained
    with torch.no_grad():
        weight = model.item_embeddings.weight
        weight[: len(residual)] = torch.as_tensor(residual, dtype=weight.dtype)
        weight[len(residual) :] = 0


# ---- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def recommend_topk(
    model: GenerativeRecommender,
    histories: list[np.ndarray],
    semantic_ids: np.ndarray,
    beam_size: int,
    batch_size: int = 512,
    device: str = "cpu",
    use_item_head: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Constrained beam search over the whole catalog -> item indices and scores (U, beam).
    use_item_head=False ranks by the codes alone even when the model has an item head."""
    was_training = model.training
    model.eval()
    search = ConstrainedBeamSearch(model, beam_size, use_item_head)
    trie = trie_tensors(build_trie(semantic_ids).as_feeds(), model.cfg.levels, device)
    # Similar lengths together: less padding, same results.
    order = np.argsort([len(h) for h in histories], kind="stable")
    items = np.full((len(histories), beam_size), -1, dtype=np.int64)
    scores = np.zeros((len(histories), beam_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        padded = pad_histories([histories[i] for i in rows], semantic_ids, model.cfg.max_history)
        out_items, out_scores = search(*history_tensors(model.cfg, *padded, device=device), *trie)
        items[rows], scores[rows] = out_items.cpu().numpy(), out_scores.float().cpu().numpy()
    model.train(was_training)
    return items, scores


def evaluate(
    model, histories, targets, semantic_ids, beam_size: int, device: str = "cpu", use_item_head: bool = True
) -> dict[str, float]:
    topk, _ = recommend_topk(model, histories, semantic_ids, beam_size, device=device, use_item_head=use_item_head)
    return topk_metrics(topk, np.asarray(targets))


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


def plan_epochs(train_cfg: TrainConfig, elapsed_s: float, epochs_done: int, world: int, device: torch.device) -> int:
    """Epochs that fit the time budget at the pace so far (validation included), so the learning
    rate finishes its decay inside the budget instead of being cut off at a high value. Re-planned
    every epoch, so a machine that gets busier shortens the plan. Rank 0's plan is every rank's:
    the schedules must match for the replicas to stay in sync."""
    per_epoch = max(elapsed_s, 1e-6) / max(1, epochs_done)
    fits = epochs_done + int(max(0.0, train_cfg.max_train_seconds - elapsed_s) / per_epoch)
    plan = torch.tensor([max(epochs_done, 1, min(train_cfg.epochs, fits))], device=device)
    if world > 1:
        dist.broadcast(plan, 0)
    return int(plan.item())


def adamw(params, lr: float, weight_decay: float, device: torch.device, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.98), by default fused into one kernel where torch has it: on CPU the
    per-tensor form took about 4x as long per step (50 against 13 ms for the recommender's 3.6M parameters)."""
    if fused is None:
        fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), fused=fused)


def bf16_autocast_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs and on CPUs with native bf16 instructions (AVX-512 BF16 or AMX).
    oneDNN reports bf16 support on any AVX-512 CPU and emulates it there: 0.57x fp32's targets/s on
    an AVX-512 Xeon without BF16 (benchmarks/bench_training.py), ~45x slower on an AVX2-only CPU."""
    if device.type == "cuda":
        return True
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class BestOnValidation:
    """The weights with the best validation NDCG@10 so far, and evaluations since it improved.
    Only rank 0 evaluates; restore() hands its best weights to every rank."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {"ndcg@10": -1.0}
        self.epoch = -1
        self.evals_since = 0
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, model: torch.nn.Module, valid: dict[str, float], epoch: int) -> None:
        if valid["ndcg@10"] > self.metrics["ndcg@10"]:
            self.metrics, self.epoch, self.evals_since = valid, epoch, 0
            self._state = copy.deepcopy(model.state_dict())
        else:
            self.evals_since += 1

    def restore(self, model: torch.nn.Module, world: int) -> None:
        state = [self._state]
        if world > 1:
            dist.broadcast_object_list(state, 0)
        if state[0] is not None:
            model.load_state_dict(state[0])


# ---- the loop --------------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: GenerativeRecommender
    best_valid: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_seconds: float
    samples_per_second: float
    curve: list[dict]


def train_recommender(
    model_cfg: Seq2SeqConfig,
    train_cfg: TrainConfig,
    train_sequences: list[np.ndarray],
    valid_histories: list[np.ndarray],
    valid_targets: np.ndarray,
    semantic_ids: np.ndarray,
    curve_path: Path | None = None,
    progress: bool = True,
    item_features: np.ndarray | None = None,
) -> TrainResult:
    rank, world = distributed_context()
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)  # same on every rank: same batch list, split by rank
    device = torch.device(train_cfg.device)
    model = GenerativeRecommender(model_cfg)
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
    model = model.to(device)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    codes = torch.as_tensor(semantic_ids, dtype=torch.long)
    sequences = [s[-train_cfg.max_sequence_items :] for s in train_sequences if len(s) >= 2]

    eval_rows = np.arange(len(valid_histories))
    if train_cfg.eval_users and train_cfg.eval_users < len(eval_rows):
        eval_rows = np.sort(np.random.default_rng(train_cfg.seed + 1).choice(eval_rows, train_cfg.eval_users, replace=False))
    eval_histories = [valid_histories[i] for i in eval_rows]
    eval_targets = np.asarray(valid_targets)[eval_rows]

    optimizer = adamw(model.parameters(), train_cfg.lr, train_cfg.weight_decay, device)
    steps_per_epoch = math.ceil(len(sequences) / train_cfg.batch_size)
    planned_epochs = train_cfg.epochs  # a time budget shortens the plan after each epoch

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5 % at the end of the plan
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        total_steps = steps_per_epoch * planned_epochs
        progress_ = (step - train_cfg.warmup_steps) / max(1, total_steps - train_cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    use_bf16 = train_cfg.bf16 and bf16_autocast_is_fast(device)
    best, curve = BestOnValidation(), []
    samples, started = 0, time.perf_counter()
    step = 0
    epoch = 0
    for epoch in range(1, train_cfg.epochs + 1):
        model.train()
        batches = sequence_batches(sequences, train_cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not progress or rank != 0, leave=False)
        epoch_loss, epoch_targets = 0.0, 0
        for batch in bar:
            shard = batch[rank::world] or batch[:1]  # a short last batch still gives every rank work
            item_codes, mask, items = collate_sequences([sequences[i] for i in shard], codes)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, n_targets = trained(item_codes.to(device), mask.to(device), items.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            samples += n_targets * world
            epoch_loss += loss.item() * n_targets
            epoch_targets += n_targets
            bar.set_postfix(loss=f"{loss.item():.3f}")
        elapsed = time.perf_counter() - started
        point = {"epoch": epoch, "step": step, "train_loss": epoch_loss / max(1, epoch_targets), "elapsed_s": round(elapsed, 1)}
        out_of_time = train_cfg.max_train_seconds is not None and elapsed > train_cfg.max_train_seconds
        if rank == 0 and (epoch % train_cfg.eval_every == 0 or epoch == train_cfg.epochs or out_of_time):
            valid = evaluate(model, eval_histories, eval_targets, semantic_ids, train_cfg.beam_size, device=str(device))
            point.update({f"valid_{k}": v for k, v in valid.items()})
            best.update(model, valid, epoch)
            if progress:
                print(json.dumps(point), flush=True)
        curve.append(point)
        if curve_path is not None and rank == 0:
            with curve_path.open("a") as f:
                f.write(json.dumps(point) + "\n")
        if train_cfg.max_train_seconds is not None:  # validation time counts toward the pace
            planned_epochs = plan_epochs(train_cfg, time.perf_counter() - started, epoch, world, device)
        stop = out_of_time or epoch >= planned_epochs or (best.evals_since >= train_cfg.patience and epoch >= train_cfg.min_epochs)
        if stop_together(stop, world, device):
            break
    train_seconds = time.perf_counter() - started
    best.restore(model, world)
    model.eval()
    return TrainResult(
        model=model,
        best_valid=best.metrics,
        best_epoch=best.epoch,
        epochs_run=epoch,
        train_seconds=train_seconds,
        samples_per_second=samples / max(train_seconds, 1e-9),
        curve=curve,
    )
