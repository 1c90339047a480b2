"""docs/plot_bundle.py writes the training curve and the code usage as PNGs inside a bundle, and
the bundle still loads (the manifest's checksums cover only the files it lists)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np

from service.bundle import load_bundle

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_next_to_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "plot_bundle.py"), str(bundle)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("training_curve.png", "code_usage.png"):
        path = bundle / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 600, (name, pixels.shape)
        assert np.ptp(pixels[..., :3]) > 0.5, f"{name} is blank"  # something was drawn
    assert load_bundle(bundle).version == load_bundle(tiny_bundle).version
