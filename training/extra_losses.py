"""Extra losses for joint training (training/loop.py ExtraLoss): each reads the recommender's
intermediate states for the batch and the objective's parts (the tokenizer), and counts in the
phases that name it. Adding one = a class here and a line in EXTRA_LOSSES."""
from __future__ import annotations

import torch
from torch import nn

from training.loop import ExtraLoss


class TokenizerLoss(ExtraLoss):
    """The tokenizer's own loss (e.g. RQ-VAE reconstruction + quantisation) on the batch's target
    items, so a phase can train the tokenizer beside the recommender."""

    def forward(self, states: dict[str, torch.Tensor], parts: nn.ModuleDict) -> torch.Tensor:
        return parts["tokenizer"].loss(states["target_items"])


EXTRA_LOSSES: dict[str, type[ExtraLoss]] = {
    "tokenizer": TokenizerLoss,
}
