"""The training loop's phases, extra losses and best checkpoint, on a toy task in one process."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.loop import ExtraLoss, LoopConfig, Objective, ParamGroup, Phase, phase_at, run_loop


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor, with_states: bool = False):
        prediction = x @ self.weight
        loss = ((prediction - y) ** 2).mean()
        return (loss, len(x), {"prediction": prediction}) if with_states else (loss, len(x))


class PullTowards(ExtraLoss):
    """Pulls the part's parameter towards the main module's mean prediction."""

    def forward(self, states: dict[str, torch.Tensor], parts: nn.ModuleDict) -> torch.Tensor:
        return (parts["side"].value - states["prediction"].mean()) ** 2


class Side(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(5.0))


class ToyTask:
    def __init__(self, valid_scores: list[float]) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])
        self.main, self.side = Regression(), Side()
        self.objective = Objective(self.main, {"side": self.side}, {"pull": PullTowards(1.0)})
        self.param_groups = [ParamGroup("recommender", list(self.main.parameters()), lr=0.05),
                             ParamGroup("side", list(self.side.parameters()), lr=0.05)]
        self.steps_per_epoch = 4
        self.valid_scores = list(valid_scores)
        self.after: list[tuple[int, str]] = []
        self.weights_at_epoch: list[torch.Tensor] = []

    def batches(self, rng: np.random.Generator) -> list[list[int]]:
        order = rng.permutation(64)
        return [order[i : i + 16].tolist() for i in range(0, 64, 16)]

    def inputs(self, batch, rank, world, device):
        return self.x[batch], self.y[batch]

    def validate(self) -> dict[str, float]:
        return {"ndcg@10": self.valid_scores.pop(0)}

    def after_epoch(self, epoch: int, phase: Phase) -> None:
        self.after.append((epoch, phase.name))
        self.weights_at_epoch.append(self.main.weight.detach().clone())

    def snapshot(self) -> dict:
        return {"main": self.main.state_dict(), "side": self.side.state_dict()}

    def restore(self, snapshot: dict) -> None:
        self.main.load_state_dict(snapshot["main"])
        self.side.load_state_dict(snapshot["side"])


def test_phases_step_their_groups_count_their_losses_and_the_best_epoch_is_restored() -> None:
    task = ToyTask(valid_scores=[0.1, 0.3, 0.2])
    phases = (Phase("main", epochs=1), Phase("joint", epochs=1, train=("recommender", "side"), losses=("pull",)),
              Phase("main-again"))
    result = run_loop(task, LoopConfig(epochs=3, patience=5, bf16=False), np.random.default_rng(0), phases,
                      progress=False)
    assert [point["phase"] for point in result.curve] == ["main", "joint", "main-again"]
    assert task.after == [(1, "main"), (2, "joint"), (3, "main-again")]
    assert "pull_loss" in result.curve[1] and "pull_loss" not in result.curve[0]
    assert result.best_epoch == 2
    # the best snapshot (epoch 2) is restored, for the main module and the part alike
    assert torch.equal(task.main.weight, task.weights_at_epoch[1])
    assert task.side.value.item() != 5.0  # the side part stepped in the joint phase only, and that state was kept


def test_a_group_outside_the_phase_does_not_step() -> None:
    task = ToyTask(valid_scores=[0.1, 0.2])
    run_loop(task, LoopConfig(epochs=2, patience=5, bf16=False), np.random.default_rng(0),
             (Phase("main", train=("recommender",), losses=("pull",)),), progress=False)
    assert task.side.value.item() == 5.0  # the pull loss gave it gradients, but its group never stepped
    assert not torch.equal(task.main.weight, torch.zeros(3))


def test_a_phase_naming_an_unknown_group_or_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        run_loop(ToyTask([0.1]), LoopConfig(epochs=1, patience=1, bf16=False), np.random.default_rng(0),
                 (Phase("joint", train=("recommender", "tokenizer")),), progress=False)
    assert phase_at((Phase("a", epochs=2), Phase("b", epochs=1)), 5).name == "b"  # the last phase runs on
