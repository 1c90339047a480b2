"""Codes learned elsewhere, read from a file: e.g. the LETTER codes published with Beauty.

Lets the recommender be compared on codes from another tokenizer without retraining that
tokenizer here. The file maps the 0-based item index to a list of tokens like "<a_12>".
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.tokenizers.base import FitReport, ItemViews, code_usage, unique_fraction

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = re.compile(r"<[a-z]+_(\d+)>")


class PrecomputedCodesTokenizer:
    kind = "precomputed"

    def __init__(self, path: str, codebook_size: int = 256, input_view: str = "text") -> None:
        self.input_view = input_view  # unused: the codes come from the file
        self.path = path
        self.codebook_size = codebook_size
        self.codes: np.ndarray | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"path": self.path, "codebook_size": self.codebook_size}

    @property
    def views(self) -> set[str]:
        return set()  # the codes come from the file

    @property
    def codebook_sizes(self) -> list[int]:
        levels = 0 if self.codes is None else self.codes.shape[1]
        return [self.codebook_size] * levels

    def _read(self) -> np.ndarray:
        path = Path(self.path) if Path(self.path).is_absolute() else REPO_ROOT / self.path
        table = json.loads(path.read_text())
        rows = [[int(TOKEN.fullmatch(t).group(1)) for t in table[str(i)]] for i in range(len(table))]
        return np.asarray(rows, dtype=np.int64)

    def fit(self, views: ItemViews, seed: int) -> FitReport:
        t0 = time.perf_counter()
        self.codes = self._read()
        if len(self.codes) != views.n_items:
            raise ValueError(f"{self.path} has codes for {len(self.codes)} items, the dataset has {views.n_items}")
        return FitReport(
            kind=self.kind, seconds=time.perf_counter() - t0, n_items=len(self.codes),
            codebook_sizes=self.codebook_sizes, code_usage=code_usage(self.codes, self.codebook_sizes),
            unique_fraction=unique_fraction(self.codes),
        )

    def encode(self, views: ItemViews) -> np.ndarray:
        if self.codes is None:
            raise RuntimeError("tokenizer is not fitted")
        return self.codes

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.codes is None:
            raise RuntimeError("tokenizer is not fitted")
        return {"codes": self.codes}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.codes = np.asarray(state["codes"], dtype=np.int64)
