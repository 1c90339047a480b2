"""LETTER (Wang et al., CIKM 2024): an RQ-VAE over the item's text embedding with a collaborative
and a diversity regulariser, `L = recon + quant + alpha * L_CF + beta * L_div`.

- L_CF: InfoNCE between each item's quantised latent and its collaborative embedding (SASRec's
  item vector) with in-batch negatives. Our SASRec vectors are 64-d and the latent 32-d, so a
  learned linear map takes the collaborative vector into the latent space (the paper's SASRec is
  32-d, the same width as its latent, and the official code takes a raw dot product).
- L_div: every epoch each level's codebook is clustered (balanced k-means, `diversity_clusters`);
  an item's code vector is pulled towards another code of its code's cluster (a uniform pick) and
  pushed from the rest of the codebook (cross-entropy over code similarities, its own code left
  out). It spreads items over codes against codebook collapse.
- Sinkhorn-balanced assignment on the last level while training (`sinkhorn_epsilon` > 0); encode()
  takes the nearest codes, and the collision level separates what still collides.
Differences from the official code, on purpose: every level's commitment reaches the encoder (the
official residuals of levels >= 2 are detached: training/tokenizers/rqvae.py RQVAE.quantize), the
clustering is vectorised, and the per-level diversity term is averaged over levels like the rest
of the quantisation loss but weighted once by beta.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.tokenizers.base import ItemViews
from training.tokenizers.rqkmeans import kmeans
from training.tokenizers.rqvae import RQVAEConfig, RQVAETokenizer


@dataclass
class LetterConfig(RQVAEConfig):
    cf_weight: float = 0.1  # alpha: L_CF (Beauty 0.1 in the paper's scripts, Instruments 0.01)
    cf_temperature: float = 1.0  # InfoNCE temperature of L_CF
    diversity_weight: float = 1e-4  # beta: L_div
    diversity_clusters: int = 10  # clusters of each level's codebook
    sinkhorn_epsilon: float = 0.003  # last level's Sinkhorn entropy (0: nearest code while training too)
    sinkhorn_iters: int = 20


def sinkhorn_codes(d2: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Codes (B,) from squared distances (B, K) through Sinkhorn-Knopp: a transport plan with
    uniform marginals over items and codes, so a batch's items spread over the codebook. Distances
    are centred and scaled to [-1, 1] first; float64 keeps exp(1 / epsilon) finite."""
    middle = (d2.max() + d2.min()) / 2
    span = ((d2.max() - d2.min()) / 2).clamp_min(1e-12)
    q = torch.exp(-((d2 - middle) / span).double() / epsilon)
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(0, keepdim=True) / q.shape[1]  # every code gets 1/K of the mass
        q = q / q.sum(1, keepdim=True) / q.shape[0]  # every item 1/B
    return q.argmax(1)


def diversity_loss(code_vectors: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, clusters: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """code_vectors (B, d) the items' chosen code vectors, codes (B,), codebook (K, d), clusters (K,)
    the cluster of each code -> cross-entropy pulling each item's code vector towards a random other
    code of its cluster, over the codebook without its own code. Items whose cluster has one code
    have no positive and are left out."""
    same = clusters[codes][:, None] == clusters[None, :]  # (B, K)
    own = F.one_hot(codes, len(codebook)).bool()
    candidates = same & ~own
    has_positive = candidates.any(1)
    if not has_positive.any():
        return code_vectors.new_zeros(())
    noise = torch.rand(candidates.shape, generator=gen)
    positive = noise.masked_fill(~candidates, -1.0).argmax(1)  # a uniform pick among the candidates
    logits = (code_vectors @ codebook.T).masked_fill(own, float("-inf"))
    return F.cross_entropy(logits[has_positive], positive[has_positive])


class LetterTokenizer(RQVAETokenizer):
    kind = "letter"

    def __init__(self, config: LetterConfig | None = None, input_view: str = "text", **overrides: Any) -> None:
        super().__init__(config or LetterConfig(**overrides), input_view=input_view)
        self._collaborative: torch.Tensor | None = None
        self.cf_map: nn.Linear | None = None
        self._clusters: list[torch.Tensor] = []

    @property
    def views(self) -> set[str]:
        return {*self.input_view.split("+"), *(["collaborative"] if self.config.cf_weight > 0 else [])}

    def fit(self, views: ItemViews, seed: int):
        cfg = self.config
        if cfg.cf_weight > 0:
            if views.collaborative is None:
                raise ValueError("LETTER's collaborative loss needs the items' collaborative embeddings")
            cf = torch.from_numpy(np.ascontiguousarray(views.collaborative, dtype=np.float32))
            self._collaborative = cf
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                self.cf_map = nn.Linear(cf.shape[1], cfg.latent_dim, bias=False)
        return self.fit_matrix(views.matrix(self.input_view), seed)

    def _extra_parameters(self) -> list[nn.Parameter]:
        return [] if self.cf_map is None else list(self.cf_map.parameters())

    def _new_epoch(self, gen: torch.Generator) -> None:
        cfg = self.config
        if cfg.diversity_weight <= 0:
            return
        with torch.no_grad():
            books = self.model.codebooks.detach()
            self._clusters = [kmeans(book.clone(), cfg.diversity_clusters, 10, gen, balanced=True)[1] for book in books]

    def _batch_loss(self, x, index, quantize, gen):
        cfg = self.config
        if not quantize:
            return super()._batch_loss(x, index, quantize, gen)
        batch = x[index]
        x_hat, codes, qloss, z_q = self.model(batch, assign=self._balanced_last_level if cfg.sinkhorn_epsilon > 0 else None)
        recon = F.mse_loss(x_hat, batch)
        loss = recon + cfg.quant_weight * qloss
        terms = {"recon": recon, "quant": qloss}
        if cfg.cf_weight > 0:
            target = self.cf_map(self._collaborative[index])
            logits = (z_q @ target.T) / cfg.cf_temperature
            cf = F.cross_entropy(logits, torch.arange(len(index)))
            loss = loss + cfg.cf_weight * cf
            terms["cf"] = cf
        if cfg.diversity_weight > 0:
            if not self._clusters:
                self._new_epoch(gen)
            books = self.model.codebooks
            div = torch.stack([diversity_loss(books[level][codes[:, level]], codes[:, level], books[level],
                                              self._clusters[level], gen) for level in range(cfg.levels)]).mean()
            loss = loss + cfg.diversity_weight * div
            terms["diversity"] = div
        return loss, terms

    def _balanced_last_level(self, level: int, d2: torch.Tensor) -> torch.Tensor:
        """Training-time assignment: Sinkhorn on the last level, the nearest code elsewhere."""
        cfg = self.config
        return sinkhorn_codes(d2, cfg.sinkhorn_epsilon, cfg.sinkhorn_iters) if level == cfg.levels - 1 else d2.argmin(1)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = super().state_dict()
        if self.cf_map is not None:
            state["cf_map.weight"] = self.cf_map.weight.detach().numpy().copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        cf_weight = state.pop("cf_map.weight", None)
        super().load_state_dict(state)
        if cf_weight is not None:
            self.cf_map = nn.Linear(cf_weight.shape[1], cf_weight.shape[0], bias=False)
            self.cf_map.weight.data.copy_(torch.from_numpy(np.asarray(cf_weight)))
