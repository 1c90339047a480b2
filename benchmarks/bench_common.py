"""What the serving benchmark's parts share: the request shape, the latency budget, the tables.

Importing it puts the repository root and benchmarks/ on sys.path, so the parts import the service
and each other the same way whether run as a script or imported by a test.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for _path in (str(Path(__file__).resolve().parent), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

HISTORY = 20  # items per request's history
K = 10  # items per answer
P99_BUDGET_MS = 50.0  # the end-to-end latency a request must stay under at the 99th percentile


def log(message: str) -> None:
    print(message, flush=True)


def table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    log(f"\n## {title}")
    log("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    log("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        log("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def round3(x):
    return None if x is None else round(x, 3)


def random_histories(n_items: int, count: int, rng: np.random.Generator, length: int = HISTORY) -> list[np.ndarray]:
    return [rng.integers(0, n_items, size=length) for _ in range(count)]
