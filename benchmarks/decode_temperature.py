"""Should the beam search divide the code logits by the ranking loss's temperature too? Scores a
bundle trained with model.code_loss_temperature != 1 (torch evaluator, constrained beam search) on
validation and test, decoding with and without the temperature.

    make bench-decode-temperature BUNDLE=models/<name>/<version>
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.bundle import load_bundle  # noqa: E402
from training.data import leave_one_out, load_dataset  # noqa: E402
from training.evaluation import beam_ranker, evaluate  # noqa: E402
from training.export import load_recommender  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--dataset", default=None, help="defaults to the bundle's dataset")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    model = load_recommender(args.bundle)
    tau = model.cfg.code_loss_temperature
    if tau == 1.0:
        raise SystemExit(f"{args.bundle} was trained with code_loss_temperature 1: decoding is the same either way")
    dataset = load_dataset(args.dataset or bundle.dataset)
    splits = leave_one_out(dataset, max_history=bundle.max_history)
    index = np.array([bundle.index_of[i] for i in dataset.item_ids])  # dataset index -> bundle index
    codes = bundle.semantic_ids.astype(np.int64)
    rows = []
    for divide in (False, True):
        model.cfg.decode_with_temperature = divide
        ranker = beam_ranker(model, codes, bundle.beam_size, use_item_head=False)
        row = {"decode_with_temperature": divide, "tau": tau}
        for split, histories, targets in (("valid", splits.valid_histories, splits.valid_targets),
                                          ("test", splits.test_histories, splits.test_targets)):
            metrics = evaluate(ranker, [index[h] for h in histories], index[np.asarray(targets)])
            row[split] = {k: round(v, 4) for k, v in metrics.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"bundle": str(args.bundle), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
