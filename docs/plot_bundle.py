#!/usr/bin/env python3
"""Plot a bundle's training curve and its tokenizer's code usage as PNGs next to it (matplotlib).

    python docs/plot_bundle.py models/<name>/<version>        # or: make plots BUNDLE=models/<name>/<version>

Writes into the bundle folder (files the manifest does not list, so its checksums stay valid):
  training_curve.png  train loss and validation Recall/NDCG@10 per epoch (training_curve.jsonl),
                      the best epoch marked (metrics.json)
  code_usage.png      per code level, items per code sorted from the most used (semantic_ids.npy),
                      with the share of the codebook used (tokenizer_fit.json / manifest)
Reads the bundle's files only; no torch, no service import.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVE_PNG = "training_curve.png"
USAGE_PNG = "code_usage.png"


def read_curve(bundle: Path) -> list[dict]:
    path = bundle / "training_curve.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curve(bundle: Path, manifest: dict) -> Path:
    curve = [row for row in read_curve(bundle) if "epoch" in row]
    if not curve:
        raise ValueError(f"{bundle / 'training_curve.jsonl'} has no epoch rows")
    epochs = [row["epoch"] for row in curve]
    fig, (loss_ax, quality_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = [(row["epoch"], row["train_loss"]) for row in curve if row.get("train_loss") is not None]
    if losses:
        loss_ax.plot(*zip(*losses), marker="o", color="tab:red")
    loss_ax.set(title="train loss", xlabel="epoch", ylabel="loss")
    for key, label in (("valid_recall@10", "validation Recall@10"), ("valid_ndcg@10", "validation NDCG@10")):
        points = [(row["epoch"], row[key]) for row in curve if row.get(key) is not None]
        if points:
            quality_ax.plot(*zip(*points), marker="o", label=label)
    best = manifest.get("metrics", {}).get("best_epoch")
    if best is not None:
        quality_ax.axvline(best, color="grey", linestyle="--", label=f"best epoch ({best})")
    quality_ax.set(title="validation", xlabel="epoch")
    quality_ax.legend(loc="best", fontsize=8)
    for ax in (loss_ax, quality_ax):
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
        ax.grid(alpha=0.3)
    fig.suptitle(f"{manifest['name']}/{manifest['version']}: training curve", fontsize=10)
    fig.tight_layout()
    out = bundle / CURVE_PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_code_usage(bundle: Path, manifest: dict) -> Path:
    codes = np.load(bundle / "semantic_ids.npy", allow_pickle=False)
    tokenizer = manifest.get("tokenizer", {})
    sizes = list(tokenizer.get("codebook_sizes") or [int(codes[:, level].max()) + 1 for level in range(codes.shape[1])])
    levels = codes.shape[1]
    raw_levels = len(tokenizer.get("code_usage") or []) or levels - 1  # the last column separates collisions
    fig, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 3.2), squeeze=False)
    for level, ax in enumerate(axes[0]):
        counts = np.bincount(codes[:, level], minlength=sizes[level] if level < len(sizes) else 0)
        used = int((counts > 0).sum())
        ordered = np.sort(counts)[::-1]
        ax.bar(np.arange(len(ordered)), ordered, width=1.0, color="tab:blue")
        collision = " (collisions)" if level >= raw_levels else ""
        ax.set(title=f"level {level}{collision}: {used}/{len(counts)} codes used", xlabel="code, most items first",
               ylabel="items" if level == 0 else None)
        ax.title.set_fontsize(8)
    fig.suptitle(f"{manifest['name']}/{manifest['version']}: items per code ({len(codes)} items, "
                 f"tokenizer {tokenizer.get('kind', '?')})", fontsize=10)
    fig.tight_layout()
    out = bundle / USAGE_PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    args = parser.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    for path in (plot_training_curve(args.bundle, manifest), plot_code_usage(args.bundle, manifest)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
