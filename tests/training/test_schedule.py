"""A time budget shortens the epoch plan, so the learning-rate decay ends inside the budget."""
from __future__ import annotations

import torch

from training.train import TrainConfig, plan_epochs

CPU = torch.device("cpu")


def test_plan_fits_the_budget_at_the_first_epochs_pace() -> None:
    cfg = TrainConfig(epochs=40, max_train_seconds=100.0)
    assert plan_epochs(cfg, first_epoch_s=30.0, world=1, device=CPU) == 3
    assert plan_epochs(cfg, first_epoch_s=0.5, world=1, device=CPU) == 40  # never more than asked for
    assert plan_epochs(cfg, first_epoch_s=500.0, world=1, device=CPU) == 1  # at least the epoch already run
