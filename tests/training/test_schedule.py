"""A time budget shortens the epoch plan, so the learning-rate decay ends inside the budget."""
from __future__ import annotations

import torch

from training.train import TrainConfig, plan_epochs

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
