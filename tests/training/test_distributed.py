"""The training loop runs unchanged under torchrun: two CPU processes (gloo) stay in sync through a
phase switch, a tokenizer trained beside the recommender and a code refresh."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_gloo_processes_train_in_lockstep(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == 3
    assert all(math.isfinite(r["loss"]) for r in ranks)
    assert all(r["moved"] > 1e-4 for r in ranks)  # it trained
    p0, p1 = np.array(ranks[0]["params"]), np.array(ranks[1]["params"])
    np.testing.assert_allclose(p0, p1, rtol=0, atol=1e-6)  # gradients were all-reduced every step
    # a phase switch: the recommender alone, then with the tokenizer, then alone again
    assert ranks[0]["phases"] == ["recommender", "joint", "fine-tune"]
    # the tokenizer trained in the joint phase and the catalog was re-encoded once, the same on both ranks
    assert ranks[0]["refreshes"] == ranks[1]["refreshes"] == 1
    assert ranks[0]["codes"] == ranks[1]["codes"]
    assert ranks[0]["item_head_codes"] == ranks[0]["codes"]  # the item head's buffer follows the codes
    np.testing.assert_allclose(ranks[0]["tokenizer"], ranks[1]["tokenizer"], rtol=0, atol=1e-6)
    assert all(math.isfinite(r["joint_tokenizer_loss"]) for r in ranks)
    # the best checkpoint holds the tokenizer too: trained only if the best epoch came after the joint phase
    if ranks[0]["best_epoch"] == 1:
        assert ranks[0]["tokenizer_moved"] == 0.0
    else:
        assert ranks[0]["tokenizer_moved"] > 1e-4
