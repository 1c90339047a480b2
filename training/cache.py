"""Stage cache: `<root>/<stage>/<sha256 of the stage's inputs>`; root = GENREC_CACHE_DIR or <repo>/.cache."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "GENREC_CACHE_DIR"  # overrides the cache root (e.g. a shared volume, or a tmp dir in tests)


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / ".cache"


def cache_key(key_parts: Iterable[str | bytes]) -> str:
    """sha256 over the parts, each length-prefixed so ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256()
    for part in key_parts:
        b = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_path(stage: str, key_parts: Iterable[str | bytes], suffix: str = "") -> Path:
    """Path of the cached output of `stage` for these inputs; the stage folder is created."""
    if not stage or "/" in stage or stage.startswith("."):
        raise ValueError(f"bad stage name {stage!r}")
    folder = cache_root() / stage
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (cache_key(key_parts) + suffix)
