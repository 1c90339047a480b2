"""One configuration over several seeds: run the pipelines (side by side or one after another),
then report the mean and spread of every metric as one JSON line and one markdown row.

Each seed is the same `genrec pipeline` command with its own log under runs/logs/, so a seed can be
rerun alone; `--summarize-only` rebuilds the summary from those logs without training.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def log_path(log_dir: Path, config: str, seed: int) -> Path:
    return log_dir / f"{config}-s{seed}.log"


def run_seeds(config: str, seeds: list[int], log_dir: Path, extra_args: list[str], parallel: bool) -> None:
    """Side by side, the cores are split evenly between the runs (torch threads per process)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // len(seeds)) if parallel else None
    env = os.environ | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
    running: list[tuple[int, subprocess.Popen]] = []
    for seed in seeds:
        cmd = [sys.executable, "-m", "training.cli", "pipeline", "--config", config, "--seed", str(seed), *extra_args]
        with open(log_path(log_dir, config, seed), "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"[genrec] seed {seed}: {' '.join(cmd[1:])} -> {log_path(log_dir, config, seed)}", flush=True)
        running.append((seed, proc))
        if not parallel:
            proc.wait()
    failed = [seed for seed, proc in running if proc.wait() != 0]
    if failed:
        raise SystemExit(f"seeds {failed} failed; see their logs in {log_dir}")


def read_summary(path: Path) -> dict[str, Any]:
    """The pipeline's last stdout line is its JSON summary."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"test"' in line:
            return json.loads(line)
    raise SystemExit(f"{path}: no pipeline summary line (did the run finish?)")


def summarize(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds, per split and metric."""
    out: dict[str, Any] = {
        "dataset": summaries[0]["dataset"], "config": summaries[0]["config"],
        "seeds": [s["seed"] for s in summaries], "beam": summaries[0]["beam"],
        "wall_s": {"mean": float(np.mean([s["wall_s"] for s in summaries])), "max": max(s["wall_s"] for s in summaries)},
        "epochs_run": [s.get("epochs_run") for s in summaries], "best_epoch": [s.get("best_epoch") for s in summaries],
    }
    # test_codes_only: models with an item head, ranked by their codes alone
    for split in [name for name in ("valid", "test", "test_codes_only") if all(name in s for s in summaries)]:
        out[split] = {}
        for metric in METRICS:
            values = np.array([s[split][metric] for s in summaries])
            out[split][metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                  "values": values.round(5).tolist()}
    return out


def markdown_row(summary: dict[str, Any]) -> str:
    t = summary["test"]
    cells = " | ".join(f"{t[m]['mean']:.4f} ± {t[m]['std']:.4f}" for m in METRICS)
    return (f"| {summary['dataset']} | {summary['config']} | {len(summary['seeds'])} seeds {summary['seeds']} | {cells} | "
            f"{summary['valid']['ndcg@10']['mean']:.4f} | {summary['wall_s']['max'] / 60:.0f} min |")
