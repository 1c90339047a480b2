"""`genrec`: the offline pipeline's commands (torch is imported only by the commands that train)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"


def _config_name(args: argparse.Namespace) -> str:
    """--config, else the best configuration for a bundled --dataset, else one derived from the data."""
    from training.configs import BEST_CONFIG, DERIVED

    if args.config:
        return args.config
    if not args.dataset:
        raise SystemExit("give --config or --dataset (beauty, scientific or a dataset folder)")
    return BEST_CONFIG.get(args.dataset, DERIVED)


def _config(args: argparse.Namespace):
    """The configuration _config_name names, on --dataset, with --set applied."""
    from training.configs import DERIVED, apply_overrides, get_config

    name = _config_name(args)
    dataset = args.dataset if args.config is not None or name == DERIVED else None
    return apply_overrides(get_config(name, dataset), args.set or [])


def _pipeline(args: argparse.Namespace) -> int:
    from training.pipeline import run_pipeline

    cfg = _config(args)
    summary = run_pipeline(cfg, seed=args.seed, models_dir=Path(args.models_dir))
    print(json.dumps(summary))
    return 0


def _new_items(args: argparse.Namespace) -> int:
    """A configuration trained and evaluated on the new-item split (training/splits.py)."""
    args.set = [*(args.set or []), "split=new-items"]
    return _pipeline(args)


def _seeds(args: argparse.Namespace) -> int:
    """The mean and spread of one configuration over several seeds."""
    from training.seeds import log_path, markdown_row, read_summary, run_seeds, summarize

    name = _config_name(args)
    log_dir = REPO_ROOT / "runs" / "logs"
    if not args.summarize_only:
        from training.pipeline import prepare_shared_inputs

        prepare_shared_inputs(_config(args))  # once, before the seeds start side by side
        extra = (["--dataset", args.dataset] if args.dataset and (args.config or name == "derived") else []) + (["--set", *args.set] if args.set else [])
        run_seeds(name, args.seeds, log_dir, extra, parallel=not args.one_at_a_time)
    summary = summarize([read_summary(log_path(log_dir, name, seed)) for seed in args.seeds])
    row = markdown_row(summary)
    with (REPO_ROOT / "runs" / "results.md").open("a") as f:
        f.write(row + "\n")
    print(row)
    print(json.dumps(summary))
    return 0


def _tune(args: argparse.Namespace) -> int:
    """A few variants of the derived configuration in a time budget, chosen on validation."""
    from training.auto_config import DataShape, describe, tune, tune_table
    from training.configs import apply_overrides, get_config
    from training.data import load_dataset

    base = apply_overrides(get_config("derived", args.dataset), args.set or [])
    print(f"[genrec] {describe(DataShape.of(load_dataset(args.dataset)), base)}", flush=True)
    result = tune(base, args.budget_min, seed=args.seed, models_dir=Path(args.models_dir))
    print(tune_table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {
        "rows": {name: {k: row[k] for k in ("valid", "test", "epochs_run", "bundle")} for name, row in result["rows"].items()}}))
    return 0


def _demo_bundle(args: argparse.Namespace) -> int:
    """Builds the `make run` bundle unless one is there already."""
    existing = sorted(Path(args.models_dir).glob("*/*/manifest.json"))
    if existing and not args.force:
        print(f"[genrec] bundle present: {existing[-1].parent}")
        return 0
    args.config, args.dataset, args.seed, args.set = "beauty-demo", None, 0, []
    return _pipeline(args)


def _eval(args: argparse.Namespace) -> int:
    """Scores an exported bundle as the service ranks: the engine (onnxruntime), then the bundle's
    transition fusion if it has one; on valid and test."""
    import numpy as np

    from service.bundle import load_bundle
    from service.engine import OnnxBeamEngine
    from service.fusion import fuse_rankings
    from training.data import item_popularity, leave_one_out, load_dataset
    from training.export import served_beams
    from training.metrics import topk_metrics
    from training.pipeline import format_table
    from training.splits import group_metrics, markdown_table, popularity_groups

    bundle = load_bundle(args.bundle)
    dataset = load_dataset(args.dataset or bundle.dataset)
    splits = leave_one_out(dataset, max_history=bundle.max_history)
    index = np.array([bundle.index_of[i] for i in dataset.item_ids])  # dataset index -> bundle index
    engine = OnnxBeamEngine(bundle, providers=args.providers)
    rows = {}

    def served_ranker(histories: list[np.ndarray]) -> np.ndarray:
        ranked = served_beams(engine, histories, args.batch_size)
        if bundle.fusion is None:
            return ranked
        return fuse_rankings(ranked, np.array([h[-1] for h in histories]), bundle.fusion, ranked.shape[1])

    for split, histories, targets in (
        ("valid", splits.valid_histories, splits.valid_targets),
        ("test", splits.test_histories, splits.test_targets),
    ):
        ranked = served_ranker([index[h] for h in histories])
        rows[split] = topk_metrics(ranked, index[np.asarray(targets)])
    # The long tail: test figures by the target's training interactions, in the bundle's item order.
    counts = np.zeros(bundle.num_items, dtype=np.int64)
    counts[index] = item_popularity(splits.train_sequences, dataset.n_items)
    by_popularity = group_metrics(ranked, index[splits.test_targets], popularity_groups(index[splits.test_targets], counts))
    print(format_table(rows))
    print("test by the target's training interactions:\n" + markdown_table({"served": by_popularity}))
    print(json.dumps({"bundle": str(args.bundle), "provider": engine.provider, **rows, "test_by_popularity": by_popularity}))
    return 0


def _text_path(args: argparse.Namespace) -> int:
    """Adds the new-item text path (text encoder graph, tokenizer arrays) to an existing bundle."""
    from training.text_encoder_export import add_text_path_to_bundle

    spec = add_text_path_to_bundle(args.bundle, args.dataset)
    print(json.dumps({"bundle": str(args.bundle), "new_items": spec}))
    return 0


def _export(args: argparse.Namespace) -> int:
    """Rebuilds a bundle's graphs from its weights with the current code (no retraining)."""
    from training.export import reexport_graphs

    reexport_graphs(args.bundle, args.item_head_candidates)
    print(f"[genrec] graphs rebuilt in {args.bundle}")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    """Transition fusion for an existing bundle, chosen on validation as the pipeline does."""
    from training.export import add_transition_fusion
    from training.pipeline import format_table

    choice = add_transition_fusion(args.bundle, args.dataset, args.batch_size)
    rows = {"valid, beam alone": choice["valid_without"], f"valid, fused (weight {choice['weight']})": choice["valid_with"],
            "test, beam alone": choice["test_without"]}
    if "test_with" in choice:
        rows["test, fused"] = choice["test_with"]
    print(format_table(rows))
    print(json.dumps({"bundle": str(args.bundle), "transition_fusion": choice}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.__main__ import main as serve_main

    return serve_main() or 0


def _sasrec(args: argparse.Namespace) -> int:
    """SASRec baseline (training/sasrec.py); every flag after `sasrec` goes to `python -m training.sasrec`."""
    from training.sasrec import main as sasrec_main

    return sasrec_main(args.sasrec_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="embeddings -> tokenizer -> recommender -> evaluation -> bundle")
    p.add_argument("--config", default=None, help="named configuration (training/configs.py); default: the best for a "
                   "bundled --dataset, else `derived` (sized from the data's statistics)")
    p.add_argument("--dataset", default=None, help="override the config's dataset: beauty, scientific or a folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models-dir", default=str(MODELS_DIR))
    p.add_argument("--set", nargs="*", action="extend", metavar="FIELD=VALUE",
                   help="override config fields, e.g. train.device=cuda model.d_model=256 tokenizer=rqkmeans")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("new-items", help="a configuration on the new-item split: ~5%% of items held out of training, "
                                         "figures on held-out targets, the rest and popularity buckets, beside the floors")
    p.add_argument("--config", default=None, help="named configuration (training/configs.py); its codes must be text-view")
    p.add_argument("--dataset", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models-dir", default=str(MODELS_DIR))
    p.add_argument("--set", nargs="*", action="extend", metavar="FIELD=VALUE", help="config overrides, e.g. new_item_fraction=0.1")
    p.set_defaults(func=_new_items)

    p = sub.add_parser("seeds", help="one configuration over several seeds: mean and spread (JSON line + markdown row)")
    p.add_argument("--config", default=None, help="default: the best configuration for --dataset")
    p.add_argument("--dataset", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--one-at-a-time", action="store_true", help="run the seeds in turn (default: side by side, cores split)")
    p.add_argument("--summarize-only", action="store_true", help="summarize the logs in runs/logs/ without training")
    p.add_argument("--set", nargs="*", action="extend", metavar="FIELD=VALUE", help="config overrides passed to every seed")
    p.set_defaults(func=_seeds)

    p = sub.add_parser("tune", help="variants of the configuration derived from a dataset, within a time budget, "
                                    "chosen on validation NDCG@10")
    p.add_argument("--dataset", required=True, help="a dataset folder (or beauty, scientific)")
    p.add_argument("--budget-min", type=float, required=True, help="minutes for all candidates together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models-dir", default=str(MODELS_DIR))
    p.add_argument("--set", nargs="*", action="extend", metavar="FIELD=VALUE", help="overrides applied to every candidate")
    p.set_defaults(func=_tune)

    p = sub.add_parser("demo-bundle", help="build the small Beauty bundle `make run` serves, if models/ has none")
    p.add_argument("--models-dir", default=str(MODELS_DIR))
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_demo_bundle)

    p = sub.add_parser("eval", help="print Recall/NDCG@5,10 of a bundle, served through onnxruntime")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--dataset", default=None, help="defaults to the bundle's dataset")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--providers", default="auto")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="rebuild a bundle's ONNX graphs from its recommender.safetensors, in place")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--item-head-candidates", type=int, default=None,
                   help="also rank the item head's best N items the beam missed (model.item_head_candidates)")
    p.set_defaults(func=_export)

    p = sub.add_parser("text-path", help="add what gives new items codes from their text (PUT /items) to a bundle")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--dataset", default=None, help="the dataset with the items' texts; defaults to the bundle's")
    p.set_defaults(func=_text_path)

    p = sub.add_parser("fuse", help="fuse a bundle's served ranking with each item's most frequent successors, "
                                    "if validation NDCG@10 rises (writes the lists and manifest.fusion in place)")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--dataset", default=None, help="the dataset it was trained on; defaults to the bundle's")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=_fuse)

    p = sub.add_parser("serve", help="run the service (same as python -m service)")
    p.set_defaults(func=_serve)

    # SASRec baseline: "+" prefix so that --flags pass through untouched to training.sasrec's own parser.
    p = sub.add_parser("sasrec", help="SASRec baseline + item-embedding artifact (flags: genrec sasrec -h)",
                       add_help=False, prefix_chars="+")
    p.add_argument("sasrec_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_sasrec)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
