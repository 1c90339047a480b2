"""Write a versioned bundle (ONNX graphs, semantic IDs, items, manifest) and check it.

The checks print how far ONNX is from torch (max abs diff of encoder memory, decoder
log-probabilities and beam scores) and whether the bundle, served through the service's own
onnxruntime engine, returns the torch evaluator's top-10 for a sample of users.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

from service.bundle import Manifest, file_digests, load_bundle
from service.engine import OnnxBeamEngine
from service.fusion import OFFSETS_FILE, SUCCESSORS_FILE, TransitionFusion, fuse_rankings, save_fusion
from training.batching import history_tensors, pad_histories
from training.beam import DecoderGraph
from training.evaluation import recommend_topk
from training.model_kinds import kind_of, model_kind


@dataclass
class ExportCheck:
    encoder_max_abs_diff: float
    decoder_max_abs_diff: float
    beam_score_max_abs_diff: float
    served_top10_equal: int
    users_checked: int
    # STORE bundles: items whose codes from the service's T2K (onnxruntime + tokenizers) equal torch's
    text_codes_equal: int | None = None
    text_codes_checked: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def check_bundle(bundle_dir: Path, model: torch.nn.Module, histories: list[np.ndarray]) -> ExportCheck:
    """Compare the bundle's ONNX graphs with torch on `histories` (a sample of real users)."""
    bundle = load_bundle(bundle_dir)
    semantic_ids = bundle.semantic_ids.astype(np.int64)
    model = model.cpu().eval()
    codes, mask, items = pad_histories(histories, semantic_ids, model.cfg.max_history)
    history = history_tensors(model.cfg, codes, mask, items)
    cpu = ["CPUExecutionProvider"]
    with torch.no_grad():
        memory = model.encode(*history)
        prefix = torch.as_tensor(semantic_ids[np.arange(len(histories)) % len(semantic_ids), :-1])
        log_probs = DecoderGraph(model)(memory, torch.as_tensor(mask), prefix)
    encoder = ort.InferenceSession(str(bundle_dir / "encoder.onnx"), providers=cpu)
    onnx_memory = encoder.run(None, {name: t.numpy() for name, t in zip(model.cfg.history_inputs, history)})[0]
    decoder = ort.InferenceSession(str(bundle_dir / "decoder.onnx"), providers=cpu)
    onnx_log_probs = decoder.run(None, {"memory": memory.numpy(), "history_mask": mask, "prefix_codes": prefix.numpy()})[0]

    torch_items, torch_scores = recommend_topk(model, histories, semantic_ids, bundle.beam_size)
    engine = OnnxBeamEngine(bundle, providers="cpu")
    served_items, served_scores = engine.search(histories)
    same = [int(np.array_equal(a[:10], b[:10])) for a, b in zip(torch_items, served_items)]
    live = torch_scores > -1e8
    return ExportCheck(
        encoder_max_abs_diff=float(np.abs(onnx_memory - memory.numpy()).max()),
        decoder_max_abs_diff=float(np.abs(onnx_log_probs - log_probs.numpy()).max()),
        beam_score_max_abs_diff=float(np.abs(served_scores[live] - torch_scores[live]).max()) if live.any() else 0.0,
        served_top10_equal=int(sum(same)),
        users_checked=len(histories),
    )


def write_bundle(
    out_dir: Path,
    *,
    name: str,
    version: str,
    dataset: str,
    model: torch.nn.Module,
    semantic_ids: np.ndarray,
    item_ids: list[str],
    titles: list[str],
    popularity_counts: np.ndarray,
    tokenizer: dict[str, Any],
    tokenizer_state: dict[str, np.ndarray],
    text_encoder: str,
    beam_size: int,
    metrics: dict[str, Any],
    training: dict[str, Any],
    extra_files: list[Path] = (),
    attributes: list[dict[str, list[str]]] | None = None,
    fusion: TransitionFusion | None = None,
) -> Path:
    """Everything the service needs, and a manifest with the sha256 of every file. attributes: per item
    {name: [values]} (training/data.py), written into items.jsonl for the service's per-request filters."""
    bundle_dir = out_dir / name / version
    bundle_dir.mkdir(parents=True, exist_ok=True)
    semantic_ids = np.asarray(semantic_ids, dtype=np.int32)
    np.save(bundle_dir / "semantic_ids.npy", semantic_ids)
    with (bundle_dir / "items.jsonl").open("w") as f:
        for i, (item_id, title) in enumerate(zip(item_ids, titles)):
            row = {"item_id": item_id, "title": title}
            if attributes is not None and attributes[i]:
                row["attributes"] = attributes[i]
            f.write(json.dumps(row) + "\n")
    # Ties broken by item index so the ranking is reproducible.
    order = np.lexsort((np.arange(len(popularity_counts)), -np.asarray(popularity_counts)))
    np.save(bundle_dir / "popularity.npy", order.astype(np.int32))
    # The successor lists the served ranking fuses with the beam (service/fusion.py), if any.
    fusion_spec = save_fusion(bundle_dir, fusion) if fusion is not None else {}
    save_file({k: np.ascontiguousarray(v) for k, v in tokenizer_state.items()}, str(bundle_dir / "tokenizer.safetensors"))
    (bundle_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for extra in extra_files:  # e.g. the training curve, next to the model it produced
        shutil.copy2(extra, bundle_dir / extra.name)
    kind = kind_of(model)
    model_kind(kind).export_graphs(model, semantic_ids.astype(np.int64), beam_size, bundle_dir)
    # torch weights too (safetensors, not a pickle): to fine-tune or re-export without retraining.
    save_torch_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(bundle_dir / "recommender.safetensors"))

    files = sorted(p.name for p in bundle_dir.iterdir() if p.is_file() and p.name != "manifest.json")
    for file_name in files:  # readable by a serving process of another uid (safetensors writes 0600)
        (bundle_dir / file_name).chmod(0o644)
    Manifest(
        name=name,
        version=version,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        dataset=dataset,
        tokenizer=tokenizer,
        model={"kind": kind, "config": model.cfg.to_dict()},
        max_history=model.cfg.max_history,
        beam_size=beam_size,
        text_encoder=text_encoder,
        metrics=metrics,
        training=training,
        fusion=fusion_spec,
        files=file_digests(bundle_dir, files),
    ).write(bundle_dir)
    (bundle_dir / "manifest.json").chmod(0o644)
    bundle_dir.chmod(0o755)
    return bundle_dir


def load_recommender(bundle_dir: Path, manifest: Manifest | None = None) -> torch.nn.Module:
    """The torch model a bundle was exported from (its manifest, or the one given, names the model kind
    and its config)."""
    manifest = manifest or load_bundle(bundle_dir, verify_checksums=False).manifest
    kind = model_kind(manifest.model["kind"])
    model = kind.module(kind.config(**manifest.model["config"]))
    model.load_state_dict(load_torch_file(str(Path(bundle_dir) / "recommender.safetensors")))
    return model.eval()


def reexport_graphs(bundle_dir: Path, item_head_candidates: int | None = None) -> None:
    """Rebuilds a bundle's ONNX graphs in place from its recommender.safetensors with the current
    graph code (a graph layout change needs no retraining), then rewrites the manifest's digests.
    item_head_candidates: also change that search setting (model.item_head_candidates) for the rebuilt graph."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "recommender.safetensors").is_file():
        raise FileNotFoundError(f"{bundle_dir} has no recommender.safetensors: its graphs cannot be rebuilt")
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    manifest = bundle.manifest
    if item_head_candidates is not None:
        config = manifest.model.get("config", {})
        if not config.get("item_head") or item_head_candidates < 0:
            raise ValueError("item_head_candidates needs a model with an item head and a count >= 0")
        manifest = replace(manifest, model={**manifest.model, "config": {**config, "item_head_candidates": item_head_candidates}})
    model = load_recommender(bundle_dir, manifest)  # the manifest is written once, after the graphs
    model_kind(manifest.model["kind"]).export_graphs(model, bundle.semantic_ids.astype(np.int64),
                                                     bundle.beam_size, bundle_dir)
    replace(manifest, files=file_digests(bundle_dir, manifest.files)).write(bundle_dir)


def served_beams(engine: OnnxBeamEngine, histories: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The engine's beam (item indices, -1 for none) for every history, batch_size at a time. -> (U, beam)"""
    return np.concatenate([engine.search(histories[s : s + batch_size])[0] for s in range(0, len(histories), batch_size)])


def add_transition_fusion(bundle_dir: Path, dataset_name: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Chooses transition fusion for an existing bundle, as the pipeline does (training/pipeline.py
    choose_transition_fusion), on its served beam (onnxruntime) over the dataset's leave-one-out split;
    writes the successor lists and manifest.fusion if a weight raises validation NDCG@10.
    -> the choice, with the test figures with and without it."""
    from training.data import leave_one_out, load_dataset
    from training.metrics import topk_metrics
    from training.pipeline import choose_transition_fusion

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    dataset = load_dataset(dataset_name or bundle.dataset)
    if list(bundle.item_ids) != list(dataset.item_ids):
        raise ValueError(f"{bundle_dir} does not list {dataset.name}'s items in its order: the successor lists "
                         "are built in the dataset's item order")
    splits = leave_one_out(dataset, max_history=bundle.max_history)
    engine = OnnxBeamEngine(bundle)
    valid_ranked = served_beams(engine, splits.valid_histories, batch_size)
    test_ranked = served_beams(engine, splits.test_histories, batch_size)
    fusion, choice = choose_transition_fusion(splits.train_sequences, dataset.n_items, valid_ranked,
                                              splits.valid_histories, splits.valid_targets)
    choice["test_without"] = topk_metrics(test_ranked, splits.test_targets)
    if fusion is not None:
        last = np.array([h[-1] for h in splits.test_histories])
        choice["test_with"] = topk_metrics(fuse_rankings(test_ranked, last, fusion, test_ranked.shape[1]),
                                           splits.test_targets)
        manifest = bundle.manifest
        replace(manifest, fusion=save_fusion(bundle_dir, fusion),
                metrics={**manifest.metrics, "transition_fusion": choice},
                files=file_digests(bundle_dir, sorted({*manifest.files, OFFSETS_FILE, SUCCESSORS_FILE}))).write(bundle_dir)
    return choice
