"""RQ-VAE tokenizer (TIGER): MLP encoder -> residual quantizer (L levels x K codes) -> MLP decoder.

Loss = reconstruction MSE + mean over levels of (codebook loss + beta * commitment loss), with the
straight-through estimator. Codebooks start from k-means on the latents' residuals (as TIGER), and
unused codes are re-seeded from random residuals every `reset_every` steps so usage stays high.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from training.tokenizers.base import FitReport, ItemViews, MatrixTokenizer, code_usage, unique_fraction
from training.tokenizers.rqkmeans import kmeans, sq_distances

Assign = Callable[[int, torch.Tensor], torch.Tensor]  # (level, squared distances (B, K)) -> codes (B,)


@dataclass
class RQVAEConfig:
    hidden: tuple[int, ...] = (512, 256, 128)  # encoder widths; the decoder mirrors them
    latent_dim: int = 32
    levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25  # commitment weight
    quant_weight: float = 1.0  # weight of the quantisation loss against reconstruction
    lr: float = 1e-3
    codebook_lr_mult: float = 10.0  # codes must keep up with the drifting latents (fewer dead codes, collisions)
    warmup_steps: int = 0  # plain autoencoder steps before the k-means codebook init
    min_lr_ratio: float = 0.1  # cosine decay to lr * this at the last step
    weight_decay: float = 1e-4  # MLP weights only, never the codebooks
    batch_size: int = 1024
    steps: int = 1000  # ~85 epochs at 1024; more steps lower recon MSE but raise collisions (measured)
    kmeans_init_iters: int = 20
    reset_every: int = 200  # steps between dead-code re-seeding passes (0 = never)
    reset_until: float = 0.8  # fraction of training after which codes are left to settle
    standardize: bool = True  # centre inputs and scale to unit mean variance, so MSE ~ 1 at start
    log_every: int = 100
    show_progress: bool = True
    # torch threads during fit; None = torch's default. One thread gives the same codes for the same seed
    # every time (with more, the order of parallel sums varies and so do the codes).
    threads: int | None = 1

    def __post_init__(self) -> None:
        if min(self.levels, self.codebook_size, self.steps, self.batch_size, self.latent_dim) < 1:
            raise ValueError(f"levels, codebook_size, steps, batch_size and latent_dim must be >= 1: {self}")
        self.hidden = tuple(self.hidden)

    def to_params(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d.pop("show_progress")
        d.pop("threads")  # run-time knobs, not part of what the tokenizer is
        return d


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, cfg: RQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _mlp([input_dim, *cfg.hidden, cfg.latent_dim])
        self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), input_dim])
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.latent_dim) * 0.01)  # (L, K, d)

    def quantize(self, z: torch.Tensor, assign: Assign | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """z (B, d) -> (z_q straight-through (B, d), codes (B, L), quant loss, residuals per level).
        assign(level, squared distances (B, K)) -> codes (B,) replaces the nearest code (e.g. a
        balanced assignment while training)."""
        residual = z
        q_sum = torch.zeros_like(z)
        codes, residuals = [], []
        loss = z.new_zeros(())
        for level in range(self.cfg.levels):
            book = self.codebooks[level]  # (K, d)
            residuals.append(residual.detach())
            d2 = sq_distances(residual.detach(), book.detach())
            idx = d2.argmin(1) if assign is None else assign(level, d2)  # (B,)
            q = book[idx]  # (B, d)
            # codebook loss moves codes to residuals; commitment pulls the encoder toward its codes
            loss = loss + F.mse_loss(q, residual.detach()) + self.cfg.beta * F.mse_loss(residual, q.detach())
            # q detached: every level's residual keeps an identity gradient to z, so each level's
            # commitment term reaches the encoder
            residual = residual - q.detach()
            q_sum = q_sum + q.detach()
            codes.append(idx)
        z_q = z + (q_sum - z).detach()  # straight-through: decoder sees codes, gradient goes to z
        return z_q, torch.stack(codes, 1), loss / self.cfg.levels, residuals

    def forward(self, x: torch.Tensor, quantize: bool = True, assign: Assign | None = None):
        """-> (reconstruction (B, D_in), codes (B, L), quant loss (), z_q (B, d))."""
        z = self.encoder(x)  # (B, d)
        if not quantize:  # autoencoder warm-up: no codes yet
            return self.decoder(z), torch.zeros(len(x), 0, dtype=torch.long), z.new_zeros(()), z
        z_q, codes, qloss, _ = self.quantize(z, assign)
        return self.decoder(z_q), codes, qloss, z_q


@dataclass
class _Norm:
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    scale: np.ndarray = field(default_factory=lambda: np.ones(1, np.float32))


class RQVAETokenizer(MatrixTokenizer):
    kind = "rqvae"

    def __init__(self, config: RQVAEConfig | None = None, input_view: str = "text", **overrides: Any) -> None:
        self.input_view = input_view
        self.config = config or RQVAEConfig(**overrides)
        self.model: RQVAE | None = None
        self.norm = _Norm()

    @property
    def params(self) -> dict[str, Any]:
        return self.config.to_params()

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.levels

    # -- helpers --------------------------------------------------------------------------------

    def _prep(self, embeddings: np.ndarray) -> torch.Tensor:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        return torch.from_numpy((x - self.norm.mean) / self.norm.scale)

    @torch.no_grad()
    def _latents(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        assert self.model is not None
        return torch.cat([self.model.encoder(x[i : i + chunk]) for i in range(0, len(x), chunk)])

    @torch.no_grad()
    def _evaluate(self, x: torch.Tensor) -> dict[str, float]:
        """Full-data reconstruction MSE (standardised units) and quantisation error relative to
        the latents' variance (scale-free, so comparable while the latent scale drifts)."""
        assert self.model is not None
        z = self._latents(x)
        z_q, _, _, _ = self.model.quantize(z)
        return {
            "recon_mse": float(F.mse_loss(self.model.decoder(z_q), x)),
            "rel_quant_error": float((z - z_q).pow(2).sum() / (z - z.mean(0)).pow(2).sum().clamp_min(1e-12)),
        }

    @torch.no_grad()
    def _init_codebooks(self, x: torch.Tensor, gen: torch.Generator) -> None:
        """TIGER: k-means on the residuals of each level, one level after another."""
        assert self.model is not None
        residual = self._latents(x)
        for level in range(self.config.levels):
            centres, assign = kmeans(residual, self.config.codebook_size, self.config.kmeans_init_iters, gen)
            self.model.codebooks[level] = centres
            residual = residual - centres[sq_distances(residual, centres).argmin(1)]

    @torch.no_grad()
    def _reset_dead_codes(self, x: torch.Tensor, gen: torch.Generator, opt: torch.optim.Optimizer) -> int:
        """Re-seeds codes no item uses with random residuals of that level; returns how many."""
        assert self.model is not None
        books = self.model.codebooks
        residual = self._latents(x)
        n_reset = 0
        for level in range(self.config.levels):
            idx = sq_distances(residual, books[level]).argmin(1)
            dead = torch.nonzero(torch.bincount(idx, minlength=self.config.codebook_size) == 0).squeeze(1)
            if len(dead):
                pick = torch.randperm(len(residual), generator=gen)[: len(dead)]
                books[level, dead[: len(pick)]] = residual[pick]
                state = opt.state.get(books, {})
                for key in ("exp_avg", "exp_avg_sq"):  # stale Adam moments would drag the new codes
                    if key in state:
                        state[key][level, dead] = 0.0
                n_reset += len(pick)
                idx = sq_distances(residual, books[level]).argmin(1)
            residual = residual - books[level][idx]
        return n_reset

    # -- interface ------------------------------------------------------------------------------

    def fit_matrix(self, embeddings: np.ndarray, seed: int) -> FitReport:
        previous = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            return self._fit(embeddings, seed)
        finally:
            torch.set_num_threads(previous)

    def _fit(self, embeddings: np.ndarray, seed: int) -> FitReport:
        t0 = time.perf_counter()
        cfg = self.config
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, dim = emb.shape
        if cfg.standardize:
            mean = emb.mean(0)
            scale = np.float32(np.sqrt(((emb - mean) ** 2).mean()) + 1e-8)
            self.norm = _Norm(mean.astype(np.float32), np.asarray([scale], np.float32))
        else:
            self.norm = _Norm(np.zeros(dim, np.float32), np.ones(1, np.float32))
        x = self._prep(emb)
        gen = torch.Generator().manual_seed(seed)
        curve: list[dict[str, float]] = []
        with torch.random.fork_rng(devices=[]):  # seed model init without touching global RNG state
            torch.manual_seed(seed)
            self.model = model = RQVAE(dim, cfg)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if name != "codebooks":
                (no_decay if name.endswith("bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
                  {"params": [model.codebooks], "weight_decay": 0.0, "lr": cfg.lr * cfg.codebook_lr_mult}]
        if self._extra_parameters():
            groups.append({"params": self._extra_parameters(), "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
        total = cfg.warmup_steps + cfg.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * s / total))
        )
        bs = min(cfg.batch_size, n)
        perm, pos = torch.randperm(n, generator=gen), 0
        acc: dict[str, float] = {"k": 0}
        resets = 0
        initial: dict[str, float] = {}
        model.train()
        for step in tqdm(range(1 - cfg.warmup_steps, cfg.steps + 1), desc="rqvae", disable=not cfg.show_progress,
                         mininterval=2.0):
            if step == 1:  # quantisation starts: codebooks from k-means on the current latents
                self._init_codebooks(x, gen)
                initial = self._evaluate(x)
            if pos + bs > n:  # new epoch
                perm, pos = torch.randperm(n, generator=gen), 0
                if step >= 1:
                    self._new_epoch(gen)
            index = perm[pos : pos + bs]
            pos += bs
            loss, terms = self._batch_loss(x, index, quantize=step >= 1, gen=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for name, value in terms.items():
                acc[name] = acc.get(name, 0.0) + value.item()
            acc["k"] += 1
            if cfg.reset_every and step > 0 and step % cfg.reset_every == 0 and step <= cfg.reset_until * cfg.steps:
                resets += self._reset_dead_codes(x, gen, opt)
            if step > 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                curve.append({"step": float(step), **{f"{name}_loss" if name != "recon" else "recon_mse": value / acc["k"]
                                                      for name, value in acc.items() if name != "k"},
                              "codes_reset": float(resets)})
                acc = {"k": 0}
            elif step == 0:
                acc = {"k": 0}  # warm-up losses are not quantised ones
        model.eval()
        codes = self.encode_matrix(emb)
        final = self._evaluate(x)
        return FitReport(
            kind=self.kind,
            seconds=time.perf_counter() - t0,
            n_items=n,
            codebook_sizes=self.codebook_sizes,
            code_usage=code_usage(codes, self.codebook_sizes),
            unique_fraction=unique_fraction(codes),
            metrics={"initial_recon_mse": initial["recon_mse"], "initial_rel_quant_error": initial["rel_quant_error"],
                     **final,
                     **{k: v for k, v in curve[-1].items() if k.endswith("_loss")}, "codes_reset": float(resets)},
            curve=curve,
        )

    def _batch_loss(self, x: torch.Tensor, index: torch.Tensor, quantize: bool, gen: torch.Generator
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch (the items `index` of the standardised inputs x) and its terms
        ("recon" and "quant", plus what a subclass adds)."""
        assert self.model is not None
        batch = x[index]
        x_hat, _, qloss, _ = self.model(batch, quantize=quantize)
        recon = F.mse_loss(x_hat, batch)
        return recon + self.config.quant_weight * qloss, {"recon": recon, "quant": qloss}

    def _extra_parameters(self) -> list[nn.Parameter]:
        """Parameters a subclass's losses train beside the RQ-VAE."""
        return []

    def _new_epoch(self, gen: torch.Generator) -> None:
        """Called at each pass over the items once quantisation runs (a subclass's per-epoch work)."""

    @torch.no_grad()
    def encode_matrix(self, embeddings: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("tokenizer is not fitted")
        self.model.eval()
        _, codes, _, _ = self.model.quantize(self._latents(self._prep(embeddings)))
        return codes.numpy().astype(np.int64)

    @torch.no_grad()
    def reconstruct(self, embeddings: np.ndarray) -> np.ndarray:
        """Decoded embeddings (original scale) of the quantised latents."""
        if self.model is None:
            raise RuntimeError("tokenizer is not fitted")
        z_q, _, _, _ = self.model.quantize(self._latents(self._prep(embeddings)))
        return self.model.decoder(z_q).numpy() * self.norm.scale + self.norm.mean

    @classmethod
    def from_residual_kmeans(cls, codebooks: np.ndarray) -> RQVAETokenizer:
        """An RQ-VAE that starts as the residual k-means tokenizer with these codebooks (L, K, D):
        one linear encoder and decoder layer, both the identity, no standardisation, so its codes
        are the k-means codes until it trains (joint training then starts where they end)."""
        levels, size, dim = codebooks.shape
        tokenizer = cls(RQVAEConfig(hidden=(), latent_dim=dim, levels=levels, codebook_size=size, standardize=False))
        tokenizer.norm = _Norm(np.zeros(dim, np.float32), np.ones(1, np.float32))
        tokenizer.model = model = RQVAE(dim, tokenizer.config)
        with torch.no_grad():
            for layer in (model.encoder[0], model.decoder[0]):
                layer.weight.copy_(torch.eye(dim))
                layer.bias.zero_()
            model.codebooks.copy_(torch.from_numpy(np.asarray(codebooks, np.float32)))
        model.eval()
        return tokenizer

    def trainable(self, views: ItemViews, keep_margin: float = 0.0) -> TrainableRQVAE:
        """The trainable form over this catalog (training/train.py trains it beside the recommender);
        it shares this tokenizer's weights, so state_dict() and encode() see what it learned.
        keep_margin: TrainableRQVAE's sticky re-encoding."""
        if self.model is None:
            raise RuntimeError("tokenizer is not fitted")
        return TrainableRQVAE(CatalogRQVAE(self.model, self._prep(views.matrix(self.input_view))), keep_margin)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError("tokenizer is not fitted")
        out = {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
        out["input_mean"] = self.norm.mean.copy()
        out["input_scale"] = self.norm.scale.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.norm = _Norm(np.asarray(state["input_mean"], np.float32), np.asarray(state["input_scale"], np.float32))
        self.model = RQVAE(int(self.norm.mean.shape[0]), self.config)
        weights = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items() if not k.startswith("input_")}
        self.model.load_state_dict(weights)
        self.model.eval()


class CatalogRQVAE(nn.Module):
    """An RQ-VAE with its catalog's (standardised) inputs, addressed by item index."""

    def __init__(self, model: RQVAE, inputs: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("inputs", inputs, persistent=False)

    def latents(self, items: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(self.inputs[items])

    def code_log_probs(self, latents: torch.Tensor, temperature: float, official_sign: bool = False) -> list[torch.Tensor]:
        """Per level (M, K): log softmax(-squared distance / temperature) of the level's residual
        (along the nearest codes' path) to every code of the level: the nearest code is the most
        likely. official_sign=True takes softmax(+distance / temperature) as ETEGRec's released code
        does, which puts the most mass on the farthest code (kept to measure that defect)."""
        sign = 1.0 if official_sign else -1.0
        residual, out = latents, []
        for book in self.model.codebooks:
            d2 = sq_distances(residual, book)
            out.append((sign * d2 / temperature).log_softmax(-1))
            residual = residual - book[d2.argmin(1)]
        return out

    def reconstruct(self, latents: torch.Tensor) -> torch.Tensor:
        z_q, _, _, _ = self.model.quantize(latents)
        return self.model.decoder(z_q)

    def loss(self, items: torch.Tensor) -> torch.Tensor:
        """Reconstruction MSE + the quantisation loss, as in fitting (quant_weight 1)."""
        x = self.inputs[items]
        x_hat, _, qloss, _ = self.model(x)
        return F.mse_loss(x_hat, x) + self.model.cfg.quant_weight * qloss


class TrainableRQVAE:
    def __init__(self, module: CatalogRQVAE, keep_margin: float = 0.0) -> None:
        self.module = module
        # > 0: re-encoding keeps an item's previous code at a level unless its squared distance to that
        # code is more than (1 + keep_margin) x the distance to the nearest one (fewer items recoded).
        self.keep_margin = keep_margin

    @torch.no_grad()
    def encode_catalog(self, previous: np.ndarray | None = None, chunk: int = 8192) -> np.ndarray:
        """(N, levels) raw codes of every item; with `previous` (N, levels) and a keep margin, sticky."""
        was_training = self.module.training
        self.module.eval()
        inputs = self.module.inputs
        codes = []
        for i in range(0, len(inputs), chunk):
            assign = None
            if previous is not None and self.keep_margin > 0:
                assign = sticky_assign(torch.as_tensor(previous[i : i + chunk], device=inputs.device), self.keep_margin)
            codes.append(self.module.model.quantize(self.module.model.encoder(inputs[i : i + chunk]), assign)[1])
        self.module.train(was_training)
        return torch.cat(codes).cpu().numpy().astype(np.int64)


def sticky_assign(previous: torch.Tensor, margin: float) -> Assign:
    """An assignment that keeps each row's previous code at a level while it is within (1 + margin) x
    the nearest code's squared distance: a code moves only when another is clearly closer."""
    def assign(level: int, d2: torch.Tensor) -> torch.Tensor:
        nearest = d2.argmin(1)
        kept = previous[:, level]
        rows = torch.arange(len(d2), device=d2.device)
        keep = d2[rows, kept] <= (1.0 + margin) * d2[rows, nearest]
        return torch.where(keep, kept, nearest)
    return assign
