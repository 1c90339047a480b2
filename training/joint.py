"""Joint training of tokenizer and recommender (ETEGRec, Liu et al., SIGIR 2025) on the loop's
phases and extra losses (training/loop.py, training/extra_losses.py).

Schedules (JointConfig.schedule):
- "alternating" (the paper): `warmup_epochs` recommender epochs on the pre-trained codes; then
  cycles of one tokenizer epoch (recommender frozen: tokenizer loss + SIA + PSA; the catalog is
  re-encoded after it) and `cycle - 1` recommender epochs (tokenizer frozen: code loss + SIA +
  PSA), for `alternating_epochs`; then the fine-tune phase, tokenizer frozen, code loss only.
- "simultaneous": the same, but both step in every batch of the alternating phase (the
  "-alternating" ablation).
- "frozen": the recommender alone on the pre-trained codes (the TIGER-style control).
Where this differs from the released code: SIA takes softmax(-distance) (official_sign=True
reproduces the code's +distance); the warm-up trains the recommender alone instead of
alternating without alignment (a tokenizer epoch with only its own loss moves codes the
recommender has not learned yet, for nothing); every level's commitment reaches the encoder
(training/tokenizers/rqvae.py); evaluation is trie-constrained (training/evaluation.py has the
unconstrained search to measure the difference).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from training.extra_losses import CodeAnchor, PreferenceSemanticAlignment, SequenceItemAlignment, TokenizerLoss
from training.loop import SINGLE_PHASE, ExtraLoss, Phase
from training.tokenizers import ItemTokenizer, RQKMeansTokenizer, RQVAETokenizer

SCHEDULES = ("alternating", "simultaneous", "frozen")


@dataclass
class JointConfig:
    schedule: str = "alternating"
    warmup_epochs: int = 2  # recommender alone first: alignment against an untrained recommender is noise
    cycle: int = 2  # one tokenizer epoch, then cycle - 1 recommender epochs (the released code's cycle 2)
    alternating_epochs: int = 6  # then the fine-tune phase until the run ends
    sia_weight: float = 1e-4  # the paper's weights
    psa_weight: float = 3e-4
    sia_temperature: float = 1.0
    psa_temperature: float = 0.07
    sia_official_sign: bool = False  # softmax(+distance), as the released code (a defect, kept to measure it)
    psa_max_pairs: int = 2048
    # genrec's variant: > 0 adds CodeAnchor in tokenizer epochs (keep items on their starting codes).
    code_anchor_weight: float = 0.0
    # genrec's variant: > 0 makes the refresh after a tokenizer epoch sticky: an item keeps its code at a
    # level unless the nearest code is closer by more than this relative margin (squared distances).
    refresh_keep_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown joint schedule {self.schedule!r}; known: {list(SCHEDULES)}")
        if self.cycle < 2 or self.warmup_epochs < 0 or self.alternating_epochs < 0:
            raise ValueError("joint: cycle must be >= 2, warmup_epochs and alternating_epochs >= 0")
        if self.refresh_keep_margin < 0:
            raise ValueError("joint: refresh_keep_margin must be >= 0")

    @classmethod
    def from_value(cls, value: JointConfig | dict | None) -> JointConfig | None:
        """A validated copy of a config field's value (`--set joint={...}` gives a dict)."""
        if value is None:
            return None
        return cls(**(value if isinstance(value, dict) else asdict(value)))

    @property
    def trains_tokenizer(self) -> bool:
        return self.schedule != "frozen"

    def alignment_losses(self) -> tuple[str, ...]:
        return tuple(name for name, weight in (("sia", self.sia_weight), ("psa", self.psa_weight)) if weight > 0)

    def tokenizer_losses(self) -> tuple[str, ...]:
        """What a phase that trains the tokenizer adds to the alignment losses."""
        return ("tokenizer", "code_anchor") if self.code_anchor_weight > 0 else ("tokenizer",)


def joint_phases(cfg: JointConfig) -> tuple[Phase, ...]:
    if not cfg.trains_tokenizer:
        return SINGLE_PHASE
    align = cfg.alignment_losses()
    phases = [Phase("warmup", cfg.warmup_epochs)] if cfg.warmup_epochs else []
    if cfg.schedule == "simultaneous":
        phases.append(Phase("joint", cfg.alternating_epochs, train=("recommender", "tokenizer"),
                            losses=(*cfg.tokenizer_losses(), *align)))
    else:
        done = 0
        while done < cfg.alternating_epochs:
            phases.append(Phase("tokenizer", 1, train=("tokenizer",), losses=(*cfg.tokenizer_losses(), *align)))
            recommender_epochs = min(cfg.cycle - 1, cfg.alternating_epochs - done - 1)
            if recommender_epochs > 0:
                phases.append(Phase("recommender", recommender_epochs, losses=align))
            done += 1 + recommender_epochs
    phases.append(Phase("finetune", None))
    return tuple(phases)


def trainable_tokenizer(tokenizer: ItemTokenizer) -> RQVAETokenizer:
    """The tokenizer in a form joint training can train: RQ-VAE kinds as they are; residual k-means
    as an RQ-VAE that starts with the same codes (identity linear encoder and decoder)."""
    if isinstance(tokenizer, RQVAETokenizer):
        return tokenizer
    if isinstance(tokenizer, RQKMeansTokenizer) and tokenizer.codebooks is not None:
        converted = RQVAETokenizer.from_residual_kmeans(tokenizer.codebooks)
        converted.input_view = tokenizer.input_view
        return converted
    raise ValueError(f"joint training needs an rqvae, letter or rqkmeans tokenizer, not {tokenizer.kind!r}")


def joint_losses(cfg: JointConfig, d_model: int, tokenizer: RQVAETokenizer, input_dim: int,
                 starting_codes: np.ndarray) -> dict[str, ExtraLoss]:
    """starting_codes: (N, levels) the tokenizer's codes of every item when joint training starts."""
    losses: dict[str, ExtraLoss] = {"tokenizer": TokenizerLoss()}
    if cfg.code_anchor_weight > 0:
        losses["code_anchor"] = CodeAnchor(cfg.code_anchor_weight, torch.as_tensor(starting_codes), cfg.sia_temperature)
    if cfg.sia_weight > 0:
        losses["sia"] = SequenceItemAlignment(cfg.sia_weight, d_model, tokenizer.config.latent_dim,
                                              cfg.sia_temperature, cfg.sia_official_sign)
    if cfg.psa_weight > 0:
        losses["psa"] = PreferenceSemanticAlignment(cfg.psa_weight, d_model, input_dim, cfg.psa_temperature,
                                                    cfg.psa_max_pairs)
    return losses
