"""Extra losses for joint training (training/loop.py ExtraLoss): each reads the recommender's
intermediate states for the batch and the objective's parts (the tokenizer), and counts in the
phases that name it. Their adapters train with the recommender and stay out of the exported
graphs. Adding one = a class here, built where its method is wired (training/joint.py joint_losses)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from training.loop import ExtraLoss


class TokenizerLoss(ExtraLoss):
    """The tokenizer's own loss (e.g. RQ-VAE reconstruction + quantisation) on the batch's target
    items, so a phase can train the tokenizer beside the recommender."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)

    def forward(self, states: dict[str, torch.Tensor], parts: nn.ModuleDict) -> torch.Tensor:
        return parts["tokenizer"].loss(states["target_items"])


def _adapter(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))


class SequenceItemAlignment(ExtraLoss):
    """ETEGRec's SIA: the user's sequence (the encoder's outputs over the history, mean-pooled,
    through an adapter into the tokenizer's latent space) and the target item's latent are each
    turned into a distribution over every level's codes by the tokenizer's quantizer; the loss is
    the symmetric KL between the two, averaged over levels. Trains the recommender towards
    sequences that quantize like their next item, and the tokenizer towards items that quantize
    like the sequences that lead to them."""

    def __init__(self, weight: float, d_model: int, latent_dim: int, temperature: float = 1.0,
                 official_sign: bool = False) -> None:
        super().__init__(weight)
        self.adapter = _adapter(d_model, latent_dim)
        self.temperature = temperature
        self.official_sign = official_sign

    def forward(self, states: dict[str, torch.Tensor], parts: nn.ModuleDict) -> torch.Tensor:
        tokenizer = parts["tokenizer"]
        valid = states["history_valid"].float()[..., None]  # (M, W, 1)
        pooled = (states["history_memory"].float() * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        sequence = tokenizer.code_log_probs(self.adapter(pooled), self.temperature, self.official_sign)
        item = tokenizer.code_log_probs(tokenizer.latents(states["target_items"]), self.temperature, self.official_sign)
        loss = pooled.new_zeros(())
        for seq_level, item_level in zip(sequence, item):
            both_ways = (seq_level.exp() * (seq_level - item_level)).sum(-1) + (item_level.exp() * (item_level - seq_level)).sum(-1)
            loss = loss + 0.5 * both_ways.mean()
        return loss / len(sequence)


class PreferenceSemanticAlignment(ExtraLoss):
    """ETEGRec's PSA: InfoNCE between the decoder's first state (the user's preference, through an
    adapter into the tokenizer's input space) and the target item's reconstruction by the tokenizer,
    cosine similarity over a temperature, both directions, in-batch negatives. Other targets that
    are the same item are masked out of the negatives. At most `max_pairs` targets of the batch
    (a seeded sample) take part, so the similarity matrix stays small."""

    def __init__(self, weight: float, d_model: int, input_dim: int, temperature: float = 0.07,
                 max_pairs: int = 2048) -> None:
        super().__init__(weight)
        self.adapter = _adapter(d_model, input_dim)
        self.temperature = temperature
        self.max_pairs = max_pairs

    def forward(self, states: dict[str, torch.Tensor], parts: nn.ModuleDict) -> torch.Tensor:
        tokenizer = parts["tokenizer"]
        preference, items = states["decoder_hidden"][:, 0].float(), states["target_items"]
        if len(items) > self.max_pairs:
            keep = torch.randperm(len(items), device=items.device)[: self.max_pairs]
            preference, items = preference[keep], items[keep]
        query = F.normalize(self.adapter(preference), dim=-1)
        key = F.normalize(tokenizer.reconstruct(tokenizer.latents(items)), dim=-1)
        logits = query @ key.T / self.temperature  # (P, P)
        same_item = items[:, None] == items[None, :]
        logits = logits.masked_fill(same_item & ~torch.eye(len(items), dtype=torch.bool, device=items.device), float("-inf"))
        labels = torch.arange(len(items), device=items.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class CodeAnchor(ExtraLoss):
    """genrec's variant, not the paper's: cross-entropy of each target item's quantizer distribution
    (the SIA distribution, softmax(-distance / T) per level) against the codes joint training
    started from. Tokenizer epochs may then reshape the latent space for SIA and PSA while items
    stay on the codes whose embeddings the recommender has learned: recoding is what made the
    alternating schedule fall behind its frozen control."""

    def __init__(self, weight: float, anchor_codes: torch.Tensor, temperature: float = 1.0) -> None:
        super().__init__(weight)
        self.register_buffer("anchor_codes", torch.as_tensor(anchor_codes, dtype=torch.long), persistent=False)
        self.temperature = temperature

    def forward(self, states: dict[str, torch.Tensor], parts: nn.ModuleDict) -> torch.Tensor:
        tokenizer = parts["tokenizer"]
        items = states["target_items"]
        levels = tokenizer.code_log_probs(tokenizer.latents(items), self.temperature)
        anchor = self.anchor_codes[items]
        return sum(F.nll_loss(log_probs.float(), anchor[:, level]) for level, log_probs in enumerate(levels)) / len(levels)

