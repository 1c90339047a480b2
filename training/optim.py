"""Optimizer, learning-rate schedule and bf16 choice, shared by every training loop."""
from __future__ import annotations

import math

import torch


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


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.05) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `floor` at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
