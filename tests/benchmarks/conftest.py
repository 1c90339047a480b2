"""The benchmarks' tests import benchmarks/*.py as the scripts do, from benchmarks/ on sys.path.
The tiny bundle (`tiny_bundle`) and the Redis server come from tests/conftest.py."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
