"""RQ-KMeans: residual k-means, level by level (k-means++ init, Lloyd iterations, optional balance)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from training.tokenizers.base import FitReport, MatrixTokenizer, code_usage, unique_fraction


# ---------------------------------------------------------------------------------------------
# k-means primitives (torch for the (N, K) distance matmuls; shared with the RQ-VAE codebook init)


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances."""
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.T + c.pow(2).sum(1)[None, :]).clamp_min_(0.0)


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D^2."""
    n = x.shape[0]
    x_sq = x.pow(2).sum(1)  # (N,) computed once: the loop below is k matrix-vector products
    centres = torch.empty(k, x.shape[1], dtype=x.dtype)

    def d2_to(c: torch.Tensor) -> torch.Tensor:
        return (x_sq - 2.0 * (x @ c) + c.dot(c)).clamp_min_(0.0)

    centres[0] = x[int(torch.randint(n, (1,), generator=gen))]
    d2 = d2_to(centres[0])
    for j in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: fill with random points
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=gen))
        centres[j] = x[idx]
        d2 = torch.minimum(d2, d2_to(centres[j]))
    return centres


def balanced_assign(d2: torch.Tensor) -> torch.Tensor:
    """Assignment with cluster capacity ceil(N/K): points with the largest regret (second best
    minus best distance) choose first, each taking its nearest cluster that still has room."""
    n, k = d2.shape
    cap = -(-n // k)
    d = d2.numpy()
    two = np.partition(d, 1, axis=1)[:, :2] if k > 1 else np.concatenate([d, d], axis=1)
    order = np.argsort(-(two[:, 1] - two[:, 0]), kind="stable")
    load = np.zeros(k, dtype=np.int64)
    penalty = np.zeros(k, dtype=d.dtype)  # +inf on full clusters
    out = np.empty(n, dtype=np.int64)
    for p in order:
        c = int(np.argmin(d[p] + penalty))
        out[p] = c
        load[c] += 1
        if load[c] >= cap:
            penalty[c] = np.inf
    return torch.from_numpy(out)


def kmeans(
    x: torch.Tensor, k: int, iters: int, gen: torch.Generator, balanced: bool = False, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means; returns (centres (K, D), assignment (N,)). Empty clusters are re-seeded
    from the points worst served by their centre, so all K codes stay in use when N >= K.
    init: starting centres (K, D) instead of k-means++ (e.g. to keep each code's identity)."""
    n = x.shape[0]
    if init is not None:
        centres = init.clone().to(x.dtype)
    else:
        centres = kmeans_pp_init(x, k, gen) if n >= k else x[torch.randint(n, (k,), generator=gen)].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(max(1, iters)):
        d2 = sq_distances(x, centres)
        assign = balanced_assign(d2) if balanced else d2.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        nonempty = counts > 0
        centres[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        empty = torch.nonzero(~nonempty).squeeze(1)
        if len(empty) and n >= k:
            err = d2.gather(1, assign[:, None]).squeeze(1)
            worst = torch.topk(err, min(len(empty), n)).indices
            centres[empty[: len(worst)]] = x[worst]
    return centres, assign


# ---------------------------------------------------------------------------------------------


@dataclass
class RQKMeansConfig:
    levels: int = 3
    codebook_size: int = 256
    iters: int = 25  # Lloyd iterations per level
    balanced: bool = False  # capacity-constrained assignment during fit (encode stays nearest-centre)

    def __post_init__(self) -> None:
        if min(self.levels, self.codebook_size, self.iters) < 1:
            raise ValueError(f"levels, codebook_size and iters must be >= 1: {self}")


class RQKMeansTokenizer(MatrixTokenizer):
    kind = "rqkmeans"

    def __init__(self, config: RQKMeansConfig | None = None, input_view: str = "text", **overrides: Any) -> None:
        self.input_view = input_view
        self.config = config or RQKMeansConfig(**overrides)
        self.codebooks: np.ndarray | None = None  # (L, K, D) float32

    @property
    def params(self) -> dict[str, Any]:
        return asdict(self.config)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.levels

    def fit_matrix(self, embeddings: np.ndarray, seed: int) -> FitReport:
        t0 = time.perf_counter()
        cfg = self.config
        x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        gen = torch.Generator().manual_seed(seed)
        residual = x.clone()
        books = []
        curve = []
        for level in range(cfg.levels):
            centres, _ = kmeans(residual, cfg.codebook_size, cfg.iters, gen, balanced=cfg.balanced)
            # Residuals use nearest-centre codes, exactly what encode() will produce.
            assign = sq_distances(residual, centres).argmin(1)
            residual = residual - centres[assign]
            books.append(centres)
            curve.append({"level": float(level), "residual_mse": float(residual.pow(2).mean())})
        self.codebooks = torch.stack(books).numpy()
        codes = self.encode_matrix(embeddings)
        return FitReport(
            kind=self.kind,
            seconds=time.perf_counter() - t0,
            n_items=len(x),
            codebook_sizes=self.codebook_sizes,
            code_usage=code_usage(codes, self.codebook_sizes),
            unique_fraction=unique_fraction(codes),
            metrics={"residual_mse": curve[-1]["residual_mse"], "input_mse": float(x.pow(2).mean())},
            curve=curve,
        )

    def encode_matrix(self, embeddings: np.ndarray) -> np.ndarray:
        if self.codebooks is None:
            raise RuntimeError("tokenizer is not fitted")
        residual = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).clone()
        codes = torch.empty(len(residual), self.config.levels, dtype=torch.long)
        for level in range(self.config.levels):
            c = torch.from_numpy(self.codebooks[level])
            codes[:, level] = sq_distances(residual, c).argmin(1)
            residual -= c[codes[:, level]]
        return codes.numpy().astype(np.int64)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.codebooks is None:
            raise RuntimeError("tokenizer is not fitted")
        return {"codebooks": self.codebooks.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        books = np.asarray(state["codebooks"], dtype=np.float32)
        if books.shape[:2] != (self.config.levels, self.config.codebook_size):
            raise ValueError(f"codebooks {books.shape} do not match config {self.config}")
        self.codebooks = books.copy()
