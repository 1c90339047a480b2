"""Training throughput on real Beauty sequences: what makes the recommender's training efficient.

Every variant trains the same model on the same batches for a few steps; the variants take turns
(round robin), so each round sees the same moments of a shared machine, and the ratios are medians
over rounds. Targets/s counts next-item targets trained (one per (history, next item) pair).

    python benchmarks/bench_training.py [--steps 6] [--rounds 3] [--threads 2] [--compile]

Variants: one pass per sequence (every next-item target at once, the training loop's way) against
one (history, target) pair per sample (the usual sliding-window way); fp32 against bf16 autocast
(where the CPU has native bf16); the model's byte-mask dropout against torch's; fused AdamW
against torch's per-tensor form; eager against torch.compile; model sizes; smaller batches (more
optimizer steps per epoch for the same targets); the share of a step spent building the batch.
The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import training.model  # noqa: E402
from training.data import leave_one_out, load_dataset  # noqa: E402
from training.model import NEG, GenerativeRecommender, Seq2SeqConfig  # noqa: E402
from training.batching import collate_sequences, pad_histories, sequence_batches  # noqa: E402
from training.configs import get_config  # noqa: E402
from training.optim import adamw, bf16_autocast_is_fast  # noqa: E402
from training.pipeline import fit_semantic_ids, pipeline_views  # noqa: E402
from training.tokenizers.base import assign_semantic_ids  # noqa: E402

BATCH = 256
SMALL_BATCHES = (64, 128)  # sequences per step, against the loop's BATCH
HISTORY = 20


def pair_loss(model: GenerativeRecommender, history_codes: torch.Tensor, history_mask: torch.Tensor,
              target_codes: torch.Tensor) -> torch.Tensor:
    """One (history, next item) pair per row: encode the history, decode the target's codes."""
    memory = model.encode(history_codes, history_mask)
    cross_bias = torch.zeros(history_mask.shape).masked_fill(~history_mask, NEG)[:, None, None, :]
    hidden = model.decode(target_codes[:, :-1], memory[:, -1], model.cross_keys_values(memory), cross_bias, groups=1)
    return model.codes_loss(hidden, target_codes)


class Variant:
    def __init__(self, name: str, cfg: Seq2SeqConfig, batches, *, pairs: bool, bf16: bool, compiled: bool,
                 steps_scale: int = 1, dropout=training.model.dropout, per_tensor_adamw: bool = False) -> None:
        torch.manual_seed(0)
        self.dropout = dropout  # the model's dropout function while this variant runs
        self.name, self.batches, self.pairs, self.bf16 = name, batches, pairs, bf16
        self.steps_scale = steps_scale  # smaller batches take more steps, so every variant sees about as many targets
        self.model = GenerativeRecommender(cfg).train()
        self.step_fn = torch.compile(self.model, dynamic=True) if compiled and not pairs else self.model
        self.optimizer = adamw(self.model.parameters(), 1e-3, 0.05, torch.device("cpu"), fused=not per_tensor_adamw)
        self.next_batch = 0
        self.rates: list[float] = []
        self.collate_share: list[float] = []

    def run(self, steps: int) -> None:
        loop_dropout, training.model.dropout = training.model.dropout, self.dropout
        try:
            self._run(steps)
        finally:
            training.model.dropout = loop_dropout

    def _run(self, steps: int) -> None:
        targets, collate_s, start = 0, 0.0, time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            inputs = self.batches[self.next_batch % len(self.batches)]()
            self.next_batch += 1
            collate_s += time.perf_counter() - t0
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                if self.pairs:
                    loss, n = pair_loss(self.model, *inputs), int(inputs[0].shape[0])
                else:
                    loss, n = self.step_fn(*inputs)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            targets += n
        wall = time.perf_counter() - start
        self.rates.append(targets / wall)
        self.collate_share.append(collate_s / wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="add the torch.compile variant (minutes of compilation on CPU; recompiles per batch shape)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    dataset = load_dataset("beauty")
    splits = leave_one_out(dataset, max_history=HISTORY)
    cfg = get_config("beauty-rqkmeans-text")
    raw_codes, tokenizer, _ = fit_semantic_ids(pipeline_views(cfg, dataset), cfg, seed=0)
    semantic_ids, _ = assign_semantic_ids(raw_codes, tokenizer.codebook_sizes)
    codes = torch.as_tensor(semantic_ids, dtype=torch.long)
    sizes = [int(v) for v in semantic_ids.max(axis=0) + 1]
    rng = np.random.default_rng(0)

    sequences = [s[-64:] for s in splits.train_sequences if len(s) >= 2]

    def feed_of(batch_size: int):
        index = sequence_batches(sequences, batch_size, rng)
        return [lambda b=b: collate_sequences([sequences[i] for i in b], codes) for b in index]

    sequence_feed = feed_of(BATCH)
    # The same targets as (history window, next item) pairs, BATCH pairs per step.
    pairs = [(s[max(0, t - HISTORY):t], s[t]) for s in sequences for t in range(1, len(s))]
    order = rng.permutation(len(pairs))

    def pair_batch(start: int):
        chunk = [pairs[i] for i in order[start:start + BATCH]]
        history_codes, history_mask, _ = pad_histories([h for h, _ in chunk], semantic_ids, HISTORY)
        return torch.as_tensor(history_codes), torch.as_tensor(history_mask), codes[[t for _, t in chunk]]

    pair_feed = [lambda s=s: pair_batch(s) for s in range(0, len(pairs) - BATCH, BATCH)]
    print(f"Beauty: {len(sequences)} training sequences, {len(pairs)} next-item targets; "
          f"{len(pairs) / len(sequences):.1f} targets per sequence, {args.threads} thread(s)", flush=True)

    def config(d: int, layers: int) -> Seq2SeqConfig:
        return Seq2SeqConfig(d_model=d, n_heads=max(2, d // 32), d_ff=4 * d, encoder_layers=layers,
                             decoder_layers=layers, codebook_sizes=sizes)

    main_cfg = config(128, 4)
    # The training loop's precision: bf16 autocast only on CPUs with native bf16 (on an AVX2-only
    # CPU oneDNN emulates it, ~45x slower per step, so there the fp32-bf16 comparison is skipped).
    loop_bf16 = bf16_autocast_is_fast(torch.device("cpu"))
    precision = "bf16" if loop_bf16 else "fp32"
    loop_name = f"one pass per sequence, {precision} (training loop)"
    variants = [
        Variant(loop_name, main_cfg, sequence_feed, pairs=False, bf16=loop_bf16, compiled=False),
        Variant(f"one pair per sample, {precision}", main_cfg, pair_feed, pairs=True, bf16=loop_bf16, compiled=False),
        Variant(f"one pass per sequence, {precision}, d 64, 2+2", config(64, 2), sequence_feed, pairs=False,
                bf16=loop_bf16, compiled=False),
        Variant(f"one pass per sequence, {precision}, d 256, 4+4", config(256, 4), sequence_feed, pairs=False,
                bf16=loop_bf16, compiled=False),
    ]
    variants += [Variant(f"one pass per sequence, {precision}, batch {size}", main_cfg, feed_of(size), pairs=False,
                         bf16=loop_bf16, compiled=False, steps_scale=BATCH // size) for size in SMALL_BATCHES]
    variants.append(Variant(f"one pass per sequence, {precision}, torch's dropout (bernoulli_ masks)", main_cfg,
                            sequence_feed, pairs=False, bf16=loop_bf16, compiled=False,
                            dropout=F.dropout))
    variants.append(Variant(f"one pass per sequence, {precision}, torch's per-tensor AdamW", main_cfg, sequence_feed,
                            pairs=False, bf16=loop_bf16, compiled=False, per_tensor_adamw=True))
    if loop_bf16:
        variants.append(Variant("one pass per sequence, fp32", main_cfg, sequence_feed, pairs=False, bf16=False,
                                compiled=False))
    if args.compile:
        variants.append(Variant(f"one pass per sequence, {precision}, torch.compile", main_cfg, sequence_feed,
                                pairs=False, bf16=loop_bf16, compiled=True))
    warmup_s = {}
    for variant in variants:  # the first steps (and compilation) are reported, not counted
        t0 = time.perf_counter()
        variant.run(2)
        warmup_s[variant.name] = time.perf_counter() - t0
        variant.rates.clear()
        variant.collate_share.clear()

    for r in range(args.rounds):
        for variant in variants:
            variant.run(args.steps * variant.steps_scale)
        print(f"round {r + 1}: " + ", ".join(f"{v.rates[-1]:.0f}" for v in variants), flush=True)

    base = float(np.median(variants[0].rates))
    rows = []
    for v in variants:
        rate = float(np.median(v.rates))
        rows.append({"variant": v.name, "targets_per_s": round(rate), "vs_training_loop": round(rate / base, 2),
                     "batch_building_share": round(float(np.median(v.collate_share)), 3)})
    print("\n| variant | targets/s | vs training loop | share of step building the batch |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['targets_per_s']} | {row['vs_training_loop']} | {row['batch_building_share']} |")
    by_name = {r["variant"]: r for r in rows}
    result = {
        "threads": args.threads,
        "precision": precision,
        "training_loop_targets_per_s": round(base),
        "one_pass_vs_pairs": round(base / by_name[f"one pair per sample, {precision}"]["targets_per_s"], 2),
        # None where the CPU has no native bf16 (the loop runs fp32 and the comparison is skipped).
        "bf16_vs_fp32": round(base / by_name["one pass per sequence, fp32"]["targets_per_s"], 2) if loop_bf16 else None,
        "batch_building_share": by_name[loop_name]["batch_building_share"],
        "fused_adamw_vs_per_tensor_adamw": round(
            base / by_name[f"one pass per sequence, {precision}, torch's per-tensor AdamW"]["targets_per_s"], 2),
        "byte_mask_dropout_vs_torch_dropout": round(
            base / by_name[f"one pass per sequence, {precision}, torch's dropout (bernoulli_ masks)"]["targets_per_s"], 2),
        "d64_2x2_vs_d128_4x4": by_name[f"one pass per sequence, {precision}, d 64, 2+2"]["vs_training_loop"],
        "d256_4x4_vs_d128_4x4": by_name[f"one pass per sequence, {precision}, d 256, 4+4"]["vs_training_loop"],
        **{f"batch{size}_vs_batch{BATCH}": by_name[f"one pass per sequence, {precision}, batch {size}"]["vs_training_loop"]
           for size in SMALL_BATCHES},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.compile:
        compiled_name = f"one pass per sequence, {precision}, torch.compile"
        result |= {"compile_vs_eager": by_name[compiled_name]["vs_training_loop"],
                   "compile_warmup_s": round(warmup_s[compiled_name], 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
