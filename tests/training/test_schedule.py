"""A time budget shortens the epoch plan, so the learning-rate decay ends inside the budget; the optimizer."""
from __future__ import annotations

import torch

from training.loop import plan_epochs
from training.optim import adamw, bf16_autocast_is_fast
from training.train import TrainConfig

CPU = torch.device("cpu")


def test_plan_fits_the_budget_at_the_pace_so_far() -> None:
    cfg = TrainConfig(epochs=40, max_train_seconds=100.0)
    assert plan_epochs(cfg, elapsed_s=30.0, epochs_done=1, world=1, device=CPU) == 3
    assert plan_epochs(cfg, elapsed_s=0.5, epochs_done=1, world=1, device=CPU) == 40  # never more than asked for
    assert plan_epochs(cfg, elapsed_s=500.0, epochs_done=1, world=1, device=CPU) == 1  # at least what already ran


def test_a_slower_pace_shortens_the_plan() -> None:
    cfg = TrainConfig(epochs=40, max_train_seconds=100.0)
    early = plan_epochs(cfg, elapsed_s=20.0, epochs_done=2, world=1, device=CPU)  # 10 s per epoch
    later = plan_epochs(cfg, elapsed_s=60.0, epochs_done=4, world=1, device=CPU)  # 15 s per epoch
    assert (early, later) == (10, 6)


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_form() -> None:
    torch.manual_seed(0)
    fused_params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = adamw(fused_params, 1e-2, 0.05, CPU)
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.05, betas=(0.9, 0.98), foreach=False)
    assert fused.defaults["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in fused_params]
        for params, opt in ((fused_params, fused), (plain_params, plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_params, plain_params):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_only_where_the_cpu_has_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # oneDNN says yes on any AVX-512
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert bf16_autocast_is_fast(CPU) is expected
