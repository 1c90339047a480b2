"""dataset -> text embeddings -> tokenizer -> semantic IDs -> recommender -> evaluation -> export.

Each stage is its own module; this file only wires them and caches the tokenizer's codes under a
key of its inputs (the embeddings cache lives in training/embeddings.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from service.fusion import TransitionFusion, fuse_rankings

from training.cache import cache_path
from training.configs import PipelineConfig, get_config
from training.data import item_popularity, leave_one_out, load_dataset, make_synthetic_dataset, write_dataset
from training.embeddings import embed_items, get_text_encoder
from training.evaluation import beam_ranker, evaluate, unconstrained_topk
from training.export import check_bundle, write_bundle
from training.text_encoder_export import add_text_path
from training.baselines import evaluate_baselines, successor_lists
from training.item_features import item_views, sasrec_reference
from training.joint import JointConfig, joint_losses, joint_phases, trainable_tokenizer
from training.metrics import topk_metrics
from training.splits import (
    CANNOT_RANK_NEW_ITEMS, NEW_ITEM_SHARE, NewItemSplit, group_metrics, markdown_table as splits_markdown, new_item_rows,
    new_item_split, popularity_groups, with_new_items_by_prefix,
)
from training.tokenizers import CatalogCodes, FitReport, ItemTokenizer, ItemViews, get_tokenizer
from training.tokenizers.base import CollisionOverflow
from training.tokenizers.diagnostics import code_neighbour_similarity
from training.store import (
    ItemTexts, StoreTask, StoreTaskConfig, k2t_identity, t2k_fidelity, text_to_codes, with_new_item_codes,
)
from training.train import train_recommender

REPO_ROOT = Path(__file__).resolve().parent.parent


def fit_semantic_ids(views: ItemViews, cfg: PipelineConfig, seed: int):
    """Tokenizer fit, cached under (the views it reads, kind, params, seed) -> (raw codes, tokenizer,
    its fit report)."""
    tokenizer = make_tokenizer(cfg)
    read = sorted(tokenizer.views)
    key = [*(views.matrix(view).tobytes() for view in read), cfg.tokenizer, cfg.item_features,
           json.dumps(tokenizer.params, sort_keys=True, default=str), str(seed)]
    path = cache_path("tokenizer", key, suffix=".safetensors")
    report_path = path.with_suffix(".json")
    if path.exists() and report_path.exists():
        state = load_file(str(path))
        raw_codes = state.pop("__raw_codes__")
        tokenizer.load_state_dict(state)
        return raw_codes, tokenizer, FitReport(**json.loads(report_path.read_text()))
    report = tokenizer.fit(views, seed=seed)
    raw_codes = tokenizer.encode(views)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**{k: np.ascontiguousarray(v) for k, v in tokenizer.state_dict().items()}, "__raw_codes__": raw_codes}, str(path))
    report_path.write_text(json.dumps(asdict(report)))
    return raw_codes, tokenizer, report


def make_tokenizer(cfg: PipelineConfig) -> ItemTokenizer:
    return get_tokenizer(cfg.tokenizer, input_view=cfg.item_features, **cfg.tokenizer_params)


def pipeline_views(cfg: PipelineConfig, dataset, progress: bool = True) -> ItemViews:
    """The item views cfg's tokenizer reads, plus the collaborative one for the code diagnostics
    (computed and cached on first use)."""
    names = make_tokenizer(cfg).views | set(cfg.item_features.split("+"))
    if cfg.collaborative_reference:
        names.add("collaborative")
    return item_views(names, lambda: embed_items(dataset.texts, get_text_encoder(cfg.text_encoder)),
                      dataset, cfg.collaborative_seed, cfg.collaborative_weight, progress, cfg.sasrec)


def prepare_shared_inputs(cfg: PipelineConfig, progress: bool = True) -> None:
    """Computes and caches what every seed of `cfg` reads (text embeddings, collaborative
    embeddings), so seeds started side by side neither repeat that work nor race on its files."""
    dataset = load_dataset(cfg.dataset)
    if pipeline_views(cfg, dataset, progress).text is None:  # the export's new-item path embeds the texts
        embed_items(dataset.texts, get_text_encoder(cfg.text_encoder))


def code_quality_figures(codes: CatalogCodes, views: ItemViews) -> dict[str, Any]:
    """Per-level code usage, items that collided before the collision level, and (with the
    collaborative view) how alike items sharing a first code are against any two items."""
    figures: dict[str, Any] = {"code_usage": [round(u, 4) for u in codes.report.code_usage],
                               "collisions_before_separation": codes.report.collisions_before_separation}
    if views.collaborative is not None:
        similarity = code_neighbour_similarity(codes.semantic_ids[:, :-1], views.collaborative)
        figures.update({k: round(v, 4) for k, v in similarity.items()})
    return figures


TRANSITION_FUSION_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
TRANSITION_LIST_SIZE = 20  # successors kept per item in the bundle


def choose_transition_fusion(train_sequences: list[np.ndarray], n_items: int, valid_ranked: np.ndarray,
                             valid_histories: list[np.ndarray], valid_targets: np.ndarray,
                             ) -> tuple[TransitionFusion | None, dict[str, Any]]:
    """The fusion weight with the highest validation NDCG@10, or none (weight 0) if no weight beats
    the beam alone. -> (fusion or None, {weight, valid_without, valid_with, valid_by_weight})."""
    offsets, successors = successor_lists(train_sequences, n_items, TRANSITION_LIST_SIZE)
    last = np.array([h[-1] for h in valid_histories])
    without = topk_metrics(valid_ranked, valid_targets)
    by_weight = {weight: topk_metrics(fuse_rankings(valid_ranked, last, TransitionFusion(offsets, successors, weight),
                                                    valid_ranked.shape[1]), valid_targets)
                 for weight in TRANSITION_FUSION_WEIGHTS}
    best = max(by_weight, key=lambda weight: by_weight[weight]["ndcg@10"])
    chosen = best if by_weight[best]["ndcg@10"] > without["ndcg@10"] else 0.0
    choice = {"weight": chosen, "valid_without": without, "valid_with": by_weight[chosen] if chosen else without,
              "valid_by_weight": {str(weight): metrics for weight, metrics in by_weight.items()}}
    return (TransitionFusion(offsets, successors, chosen) if chosen else None), choice


def reference_rows(cfg: PipelineConfig, dataset, splits) -> dict[str, dict[str, dict[str, float]]]:
    """The non-learned floors on the same split and, with cfg.collaborative_reference, SASRec's
    figures: {row: {"valid": metrics, "test": metrics}}."""
    rows = evaluate_baselines(splits, dataset.n_items)
    sasrec = sasrec_reference(dataset, cfg.collaborative_seed, cfg.sasrec) if cfg.collaborative_reference else None
    return rows | ({"SASRec": sasrec} if sasrec else {})


def floors_table(valid: dict[str, float], test: dict[str, float], floors: dict[str, dict[str, dict[str, float]]]) -> str:
    """The model beside the floors, R@10 and N@10; a warning in bold when it is below one on validation."""
    lines = ["| row | valid R@10 | valid N@10 | test R@10 | test N@10 |", "|---|---|---|---|---|"]
    for name, row in {"this model": {"valid": valid, "test": test}, **floors}.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[split][k]:.4f}" for split in ("valid", "test")
                                                  for k in ("recall@10", "ndcg@10")) + " |")
    below = [name for name, row in floors.items() if name != "SASRec"
             and (valid["ndcg@10"] < row["valid"]["ndcg@10"] or valid["recall@10"] < row["valid"]["recall@10"])]
    if below:
        lines.append(f"\n**WARNING: this model is below the {', '.join(below)} floor on validation (R@10 or N@10).**")
    return "\n".join(lines)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    keys = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    lines = ["| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for split, metrics in rows.items():
        lines.append(f"| {split} | " + " | ".join(f"{metrics[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def run_pipeline(cfg: PipelineConfig, seed: int = 0, models_dir: Path = REPO_ROOT / "models", progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str, t0: float) -> None:
        timings[stage] = round(time.perf_counter() - t0, 1)
        if progress:
            print(f"[genrec] {stage}: {timings[stage]} s", flush=True)

    t0 = time.perf_counter()
    dataset = load_dataset(cfg.dataset)
    new_items: NewItemSplit | None = None
    if cfg.split == "new-items":
        if "collaborative" in cfg.item_features:
            raise ValueError(f"the new-item split needs text-view codes: {CANNOT_RANK_NEW_ITEMS}")
        # SASRec's cached table and figures come from the leave-one-out split, held-out items included.
        cfg = replace(cfg, collaborative_reference=False)
        new_items = new_item_split(dataset, cfg.model.max_history, cfg.new_item_fraction, cfg.new_item_seed)
        splits = new_items.splits
    elif cfg.split == "leave-one-out":
        splits = leave_one_out(dataset, max_history=cfg.model.max_history)
    else:
        raise ValueError(f"unknown split {cfg.split!r}; known: leave-one-out, new-items")
    lap("data", t0)

    t0 = time.perf_counter()
    views = pipeline_views(cfg, dataset, progress)
    lap("item_features", t0)

    t0 = time.perf_counter()
    arrival_order = None
    if new_items is None:
        raw_codes, tokenizer, fit_report = fit_semantic_ids(views, cfg, seed)
    else:  # fitted on the known items; the held-out ones get codes from their text, and collision codes last
        known = new_items.known_items
        _, tokenizer, fit_report = fit_semantic_ids(ItemViews(text=views.text[known]), cfg, seed)
        raw_codes = tokenizer.encode(views)
        arrival_order = np.concatenate([known, new_items.held_out])
    codes = CatalogCodes(raw_codes, tokenizer.codebook_sizes, cfg.collision_capacity, arrival_order)
    lap("tokenizer", t0)
    code_quality = code_quality_figures(codes, views)
    if progress:
        print(f"[genrec] code quality: {json.dumps(code_quality)}", flush=True)

    model_cfg = replace(cfg.model, codebook_sizes=list(codes.codebook_sizes), item_count=len(raw_codes))
    train_cfg = replace(cfg.train, seed=seed, beam_size=cfg.beam_size)
    # Joint training (training/joint.py): the tokenizer keeps learning; the bundle keeps its trained form.
    joint = JointConfig.from_value(cfg.joint)
    joint_kwargs: dict[str, Any] = {}
    if joint is not None and joint.trains_tokenizer:
        tokenizer = trainable_tokenizer(tokenizer)
        trainable = tokenizer.trainable(views, keep_margin=joint.refresh_keep_margin)
        joint_kwargs = {"tokenizer": trainable, "phases": joint_phases(joint),
                        "extra_losses": joint_losses(joint, model_cfg.d_model, tokenizer, trainable.module.inputs.shape[1],
                                                     raw_codes)}
    # STORE (training/store.py): its task mix needs every item's text as WordPiece ids.
    store_texts, store_kwargs, train_items = None, {}, np.arange(dataset.n_items)
    if new_items is not None:
        train_items = new_items.known_items
    if cfg.model_kind == "store":
        store_cfg = StoreTaskConfig.from_value(cfg.store)
        store_texts = ItemTexts.from_texts(dataset.texts, model_cfg.max_text_tokens)
        model_cfg = replace(model_cfg, text_output_size=len(store_texts.output_vocabulary(train_items)))
        store_kwargs = {"task_type": StoreTask, "phases": store_cfg.phases(),
                        "task_kwargs": {"texts": store_texts, "train_items": train_items, "store": store_cfg}}
    initial_raw_codes = codes.semantic_ids[:, :-1].copy()
    version = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-s{seed}"
    run_dir = models_dir.parent / "runs" / cfg.name / version
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    (run_dir / "tokenizer_fit.json").write_text(json.dumps(asdict(fit_report), indent=2))
    result = train_recommender(
        model_cfg, train_cfg, splits.train_sequences, splits.valid_histories, splits.valid_targets,
        codes, curve_path=run_dir / "training_curve.jsonl", progress=progress,
        item_features=views.matrix(cfg.item_features), model_kind=cfg.model_kind, **joint_kwargs, **store_kwargs,
    )
    semantic_ids, sid_report = result.codes.semantic_ids, result.codes.report
    if result.codes.refreshes:  # the codes the bundle keeps are the trained ones
        code_quality = code_quality_figures(result.codes, views)
        code_quality["items_recoded_by_joint_training"] = float((semantic_ids[:, :-1] != initial_raw_codes).any(1).mean())
    lap("train", t0)

    t0 = time.perf_counter()
    device = train_cfg.device

    def evaluated_rows(n: int) -> np.ndarray:  # every row (the protocol), or a seeded sample (demo only)
        if cfg.final_eval_users is not None and cfg.final_eval_users < n:
            return np.sort(np.random.default_rng(seed).choice(n, cfg.final_eval_users, replace=False))
        return np.arange(n)

    users, valid_users = evaluated_rows(len(splits.test_targets)), evaluated_rows(len(splits.valid_targets))
    valid_histories = [splits.valid_histories[u] for u in valid_users]
    ranker = beam_ranker(result.model, semantic_ids, cfg.beam_size, device)
    valid_targets = splits.valid_targets[valid_users]
    valid_ranked = ranker(valid_histories)
    valid = topk_metrics(valid_ranked, valid_targets)
    candidates_choice = None
    if cfg.choose_item_head_candidates and getattr(model_cfg, "item_head", False) and not model_cfg.item_head_candidates:
        # An inference setting (training/beam.py): kept, and exported, only if validation NDCG@10 is higher.
        result.model.cfg.item_head_candidates = cfg.beam_size
        ranked_with = ranker(valid_histories)
        with_candidates = topk_metrics(ranked_with, valid_targets)
        chosen = cfg.beam_size if with_candidates["ndcg@10"] > valid["ndcg@10"] else 0
        candidates_choice = {"chosen": chosen, "valid_without": valid, "valid_with": with_candidates}
        result.model.cfg.item_head_candidates = chosen
        valid, valid_ranked = (with_candidates, ranked_with) if chosen else (valid, valid_ranked)
        if progress:
            print(f"[genrec] item-head candidates: {chosen} (valid N@10 {valid['ndcg@10']:.4f} with them: "
                  f"{with_candidates['ndcg@10']:.4f}, without: {candidates_choice['valid_without']['ndcg@10']:.4f})", flush=True)
    test_histories = [splits.test_histories[u] for u in users]
    test_ranked = ranker(test_histories)
    fusion, fusion_choice = None, None
    if cfg.choose_transition_fusion and new_items is None:
        fusion, fusion_choice = choose_transition_fusion(splits.train_sequences, dataset.n_items, valid_ranked,
                                                         valid_histories, valid_targets)
        if fusion is not None:  # from here on the figures are the served (fused) ranking's
            valid = fusion_choice["valid_with"]
            fusion_choice["test_without"] = topk_metrics(test_ranked, splits.test_targets[users])
            test_ranked = fuse_rankings(test_ranked, np.array([h[-1] for h in test_histories]), fusion, test_ranked.shape[1])
        if progress:
            print(f"[genrec] transition fusion: weight {fusion_choice['weight']} (valid N@10 "
                  f"{fusion_choice['valid_with']['ndcg@10']:.4f} with it, {fusion_choice['valid_without']['ndcg@10']:.4f} "
                  f"without)", flush=True)
    test = topk_metrics(test_ranked, splits.test_targets[users])
    floors = reference_rows(cfg, dataset, splits)
    final_ranked = test_ranked  # the ranking the test figures are of
    new_item_figures = None
    store_figures: dict[str, Any] = {}
    if store_texts is not None:  # T2K's fidelity on (a sample of) the items it was trained on
        sample = np.sort(np.random.default_rng(seed).choice(train_items, min(2000, len(train_items)), replace=False))
        store_figures["t2k_known_items"] = t2k_fidelity(result.model, store_texts, semantic_ids, sample)
    if new_items is not None:  # the test rows by target group, beside the floors on the same split
        # Held-out items' codes as the training catalog has them: the tokenizer's encode of their text
        # embedding, or with STORE's own codes the nearest centres of their pooled text states.
        catalog_codes = "own-code centres" if store_texts is not None and result.codes.refreshes else "tokenizer encode"
        model_rows = {f"this model (new items: {catalog_codes})": test_ranked}
        codes_by_source = {catalog_codes: semantic_ids}  # where the new items' codes came from -> the codes ranked with
        if store_texts is not None:  # STORE's own way: T2K gives the held-out items their codes
            t2k_raw = text_to_codes(result.model, store_texts, new_items.held_out)
            store_figures[f"t2k_new_items_matching_{catalog_codes.replace(' ', '_')}"] = float(
                (t2k_raw == result.codes.semantic_ids[new_items.held_out, :-1]).all(1).mean())
            try:
                semantic_ids = with_new_item_codes(semantic_ids, new_items.held_out, t2k_raw, model_cfg.codebook_sizes)
            except CollisionOverflow as overflow:  # the bundle keeps the catalog's codes; the figure says why
                store_figures["t2k_new_items_not_placed"] = str(overflow)
            else:  # the summary's test figures (and the bundle) are then those of T2K's codes
                model_rows["this model (new items: T2K)"] = beam_ranker(result.model, semantic_ids, cfg.beam_size,
                                                                        device)(test_histories)
                codes_by_source["T2K"] = semantic_ids
                final_ranked = model_rows["this model (new items: T2K)"]
                test = topk_metrics(final_ranked, splits.test_targets[users])
            # K2T on the held-out items' codes: does the generated text find the item again?
            store_figures["k2t_new_items"] = k2t_identity(result.model, semantic_ids, new_items.held_out, train_items,
                                                          dataset.titles, views.text, get_text_encoder(cfg.text_encoder))
        # TIGER's cold-start retrieval: new items placed after the ranked items sharing their code prefix.
        for source, ranked_with in codes_by_source.items():
            model_rows[f"this model (new items: {source}, placed by shared prefix, share {NEW_ITEM_SHARE})"] = (
                with_new_items_by_prefix(model_rows[f"this model (new items: {source})"], ranked_with, new_items.held_out))
        new_item_figures = {"held_out_items": int(len(new_items.held_out)), "note": CANNOT_RANK_NEW_ITEMS,
                            "rows": new_item_rows(new_items, model_rows, views.text, users)}
    # The long tail: test figures by the target's training interactions (training/splits.py).
    test_by_popularity = group_metrics(final_ranked, splits.test_targets[users], popularity_groups(
        splits.test_targets[users], item_popularity(splits.train_sequences, dataset.n_items)))
    # What the generated codes alone rank, to tell the item head's share of the figures.
    test_codes_only = (evaluate(beam_ranker(result.model, semantic_ids, cfg.beam_size, device, use_item_head=False),
                                test_histories, splits.test_targets[users]) if model_cfg.item_head else None)
    test_unconstrained = None
    if cfg.evaluate_unconstrained:  # as ETEGRec's released code evaluates: generated non-items are misses
        free = unconstrained_topk(result.model, test_histories, semantic_ids, cfg.beam_size, device=device)
        test_unconstrained = topk_metrics(free, splits.test_targets[users]) | {"invalid@10": float((free[:, :10] < 0).mean())}
    lap("evaluate", t0)
    figures = {
        "valid": valid,
        "test": test,
        **({"test_codes_only": test_codes_only} if test_codes_only else {}),
        **({"item_head_candidates": candidates_choice} if candidates_choice else {}),
        **({"transition_fusion": fusion_choice} if fusion_choice else {}),
        **({"test_unconstrained": test_unconstrained} if test_unconstrained else {}),
        **({"split": cfg.split, "new_items": new_item_figures} if new_item_figures else {}),
        **({"store": store_figures} if store_figures else {}),
        "test_by_popularity": test_by_popularity,
        "evaluated_users": len(users),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "floors": floors,
    }
    # Written before export, so a run whose export fails keeps what its training and evaluation cost.
    (run_dir / "evaluation.json").write_text(json.dumps(figures | {"timings_s": timings}, indent=2))

    tokenizer_info = {
        "kind": tokenizer.kind,
        "item_features": cfg.item_features,
        "params": tokenizer.params,
        "levels": int(semantic_ids.shape[1]),
        "codebook_sizes": sid_report.codebook_sizes,
        **code_quality,
    }
    t0 = time.perf_counter()
    bundle_dir = write_bundle(
        models_dir,
        name=cfg.name,
        version=version,
        dataset=dataset.name,
        model=result.model,
        semantic_ids=semantic_ids,
        item_ids=dataset.item_ids,
        titles=dataset.titles,
        attributes=dataset.attributes,
        popularity_counts=item_popularity(splits.train_sequences, dataset.n_items),
        tokenizer=tokenizer_info,
        tokenizer_state=tokenizer.state_dict(),
        text_encoder=cfg.text_encoder,
        beam_size=cfg.beam_size,
        metrics={"valid": valid, "test": test, **({"test_codes_only": test_codes_only} if test_codes_only else {}),
                 **({"item_head_candidates": candidates_choice} if candidates_choice else {}),
                 **({"transition_fusion": fusion_choice} if fusion_choice else {}),
                 **({"test_unconstrained": test_unconstrained} if test_unconstrained else {}),
                 **({"new_items": new_item_figures} if new_item_figures else {}),
                 **({"store": store_figures} if store_figures else {}),
                 "test_by_popularity": test_by_popularity, "floors": floors, "code_quality": code_quality,
                 "best_epoch": result.best_epoch, "evaluated_users": len(users)},
        training={
            "config": cfg.to_dict() | {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()},
            "seed": seed,
            "epochs_run": result.epochs_run,
            "train_seconds": round(result.train_seconds, 1),
            "samples_per_second": round(result.samples_per_second, 1),
        },
        extra_files=[run_dir / "training_curve.jsonl", run_dir / "tokenizer_fit.json"],
        fusion=fusion,
    )
    # What gives a new item codes from its text in the service (text encoder graph, tokenizer arrays).
    new_item_path = add_text_path(bundle_dir, tokenizer_kind=tokenizer.kind, tokenizer_state=tokenizer.state_dict(),
                                  item_features=cfg.item_features, text_encoder=cfg.text_encoder, texts=dataset.texts,
                                  text_embeddings=views.text, seed=seed)
    if progress:
        print(f"[genrec] new-item text path: {json.dumps(new_item_path)}", flush=True)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(splits.test_histories), min(cfg.check_users, len(splits.test_histories)), replace=False)
    check = check_bundle(bundle_dir, result.model, [splits.test_histories[i] for i in sample])
    if store_texts is not None:  # the service's T2K (onnxruntime + tokenizers) against torch's
        from training.store import check_text_codes

        check.text_codes_equal, check.text_codes_checked = check_text_codes(
            bundle_dir, result.model, dataset.texts, rng.choice(dataset.n_items, min(cfg.check_users, dataset.n_items),
                                                                replace=False))
    lap("export", t0)
    if progress:
        print(f"[genrec] export check: {json.dumps(check.to_dict())}", flush=True)
        print(format_table({"valid": valid, "test": test}), flush=True)
        print(floors_table(valid, test, floors), flush=True)
        print("test by the target's training interactions:\n" + splits_markdown(
            {"this model": test_by_popularity} | {name: row["test_by_popularity"] for name, row in floors.items()
                                                  if "test_by_popularity" in row}), flush=True)
        if new_item_figures:
            print(f"[genrec] new-item split: {new_item_figures['held_out_items']} items held out", flush=True)
            print(splits_markdown(new_item_figures["rows"]), flush=True)
            print(CANNOT_RANK_NEW_ITEMS, flush=True)
    summary = {
        "dataset": dataset.name,
        "config": cfg.name,
        "seed": seed,
        "beam": cfg.beam_size,
        "wall_s": round(time.perf_counter() - started, 1),
        "tokenizer": {"kind": cfg.tokenizer, "item_features": cfg.item_features, **code_quality},
        **figures,
        "train_samples_per_s": round(result.samples_per_second, 1),
        "timings_s": timings,
        "export_check": check.to_dict(),
        "bundle": str(bundle_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    row = results_row(summary)
    with (models_dir.parent / "runs" / "results.md").open("a") as f:
        f.write(row + "\n")
    if progress:
        print(row, flush=True)
    return summary


def results_row(summary: dict[str, Any]) -> str:
    """One markdown row: | dataset | config | seed | test R@5 R@10 N@5 N@10 | valid N@10 | wall |"""
    t = summary["test"]
    return (f"| {summary['dataset']} | {summary['config']} | {summary['seed']} | {t['recall@5']:.4f} | "
            f"{t['recall@10']:.4f} | {t['ndcg@5']:.4f} | {t['ndcg@10']:.4f} | {summary['valid']['ndcg@10']:.4f} | "
            f"{summary['wall_s'] / 60:.0f} min |")



def build_demo_bundle(out_dir: Path, seed: int = 0, n_users: int = 300, n_items: int = 60) -> Path:
    """A complete bundle from a tiny synthetic catalog in seconds: for tests and examples."""
    out_dir = Path(out_dir)
    data_dir = write_dataset(make_synthetic_dataset(n_users, n_items, seed=seed), out_dir / "data")
    summary = run_pipeline(get_config("tiny", str(data_dir)), seed=seed, models_dir=out_dir / "models", progress=False)
    return Path(summary["bundle"])
