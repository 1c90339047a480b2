"""Run by torchrun from test_distributed.py: a few DDP steps, then each rank writes what it holds."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training.data import leave_one_out, make_synthetic_dataset
from training.model import GenerativeRecommender, Seq2SeqConfig
from training.train import TrainConfig, train_recommender


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dataset = make_synthetic_dataset(n_users=120, n_items=40, seed=0)
    splits = leave_one_out(dataset)
    rng = np.random.default_rng(0)
    semantic_ids = np.unique(np.c_[rng.integers(0, 8, (200, 2)), np.zeros((200, 1), int)], axis=0)[:40]
    semantic_ids[:, 2] = 0
    semantic_ids = np.unique(np.c_[semantic_ids[:, :2], np.arange(40) % 3], axis=0)[:40]
    model_cfg = Seq2SeqConfig(codebook_sizes=[8, 8, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1)
    torch.manual_seed(0)  # train_recommender seeds the same way: this is its initial model
    initial = torch.cat([p.detach().flatten() for p in GenerativeRecommender(model_cfg).parameters()])
    result = train_recommender(
        model_cfg,
        TrainConfig(epochs=2, batch_size=16, warmup_steps=2, eval_users=20, min_epochs=0),
        splits.train_sequences, splits.valid_histories, splits.valid_targets, semantic_ids, progress=False,
    )
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "world": dist.get_world_size(), "params": flat.tolist(), "epochs": result.epochs_run,
        "loss": result.curve[-1]["train_loss"], "moved": float((flat - initial).abs().max()),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
