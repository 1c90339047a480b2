"""Run by torchrun from test_distributed.py: DDP training in two phases (recommender alone, then
recommender + tokenizer with the tokenizer's loss and a code refresh), then each rank writes what
it holds."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training.data import leave_one_out, make_synthetic_dataset
from training.embeddings import HashingEncoder
from training.extra_losses import TokenizerLoss
from training.loop import Phase
from training.model import GenerativeRecommender, Seq2SeqConfig
from training.tokenizers import CatalogCodes, ItemViews, get_tokenizer
from training.train import TrainConfig, train_recommender


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dataset = make_synthetic_dataset(n_users=120, n_items=40, seed=0)
    splits = leave_one_out(dataset)
    views = ItemViews(text=HashingEncoder(16).encode(dataset.texts))
    tokenizer = get_tokenizer("rqvae", hidden=[16], latent_dim=8, levels=2, codebook_size=8, steps=30, batch_size=40,
                              show_progress=False, reset_every=0)
    tokenizer.fit(views, seed=0)
    tokenizer_before = np.concatenate([v.ravel() for v in tokenizer.state_dict().values()])
    codes = CatalogCodes(tokenizer.encode(views), tokenizer.codebook_sizes, collision_capacity=40)
    initial_codes = codes.semantic_ids.copy()
    model_cfg = Seq2SeqConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1,
                              item_head=True, item_count=40)
    torch.manual_seed(0)  # train_recommender seeds the same way: this is its initial model
    initial = torch.cat([p.detach().flatten() for p in GenerativeRecommender(
        Seq2SeqConfig(**{**model_cfg.to_dict(), "codebook_sizes": codes.codebook_sizes})).parameters()])
    phases = (Phase("recommender", epochs=1),
              Phase("joint", epochs=1, train=("recommender", "tokenizer"), losses=("tokenizer",)),
              Phase("fine-tune"))
    trainable = tokenizer.trainable(views)
    result = train_recommender(
        model_cfg,
        TrainConfig(epochs=3, batch_size=16, warmup_steps=2, eval_users=20, min_epochs=0, tokenizer_lr=0.05),
        splits.train_sequences, splits.valid_histories, splits.valid_targets, codes, progress=False,
        tokenizer=trainable, phases=phases, extra_losses={"tokenizer": TokenizerLoss(1.0)},
    )
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    tokenizer_after = np.concatenate([v.ravel() for v in tokenizer.state_dict().values()])
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "world": dist.get_world_size(), "params": flat.tolist(), "epochs": result.epochs_run,
        "loss": result.curve[-1]["train_loss"], "moved": float((flat - initial).abs().max()),
        "phases": [point["phase"] for point in result.curve], "refreshes": result.codes.refreshes,
        "codes": result.codes.semantic_ids.tolist(), "initial_codes": initial_codes.tolist(),
        "item_head_codes": result.model.item_codes.tolist(),
        "tokenizer": tokenizer_after.tolist(), "tokenizer_moved": float(np.abs(tokenizer_after - tokenizer_before).max()),
        "best_epoch": result.best_epoch, "joint_tokenizer_loss": result.curve[1]["tokenizer_loss"],
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
