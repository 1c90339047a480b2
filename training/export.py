"""Write a versioned bundle (ONNX graphs, semantic IDs, items, manifest) and check it.

The checks print how far ONNX is from torch (max abs diff of encoder memory, decoder
log-probabilities and beam scores) and whether the bundle, served through the service's own
onnxruntime engine, returns the torch evaluator's top-10 for a sample of users.
"""
from __future__ import annotations

import io
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

from service.bundle import file_digests, load_bundle
from service.engine import OnnxBeamEngine
from service.trie import build_trie
from training.beam import ConstrainedBeamSearch, DecoderGraph, EncoderGraph, trie_input_names, trie_tensors
from training.model import GenerativeRecommender
from training.train import history_tensors, pad_histories, recommend_topk

SCHEMA_VERSION = 1
OPSET = 17


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but handles the unrolled search
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=OPSET,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
        )
    path.write_bytes(buffer.getvalue())


def export_graphs(model: GenerativeRecommender, semantic_ids: np.ndarray, beam_size: int, out_dir: Path) -> None:
    model = model.cpu().eval()
    levels = model.cfg.levels
    history_names = model.cfg.history_inputs
    padded = pad_histories([np.arange(min(3, len(semantic_ids)))] * 2, semantic_ids, model.cfg.max_history)
    history = history_tensors(model.cfg, *padded)
    history_axes = {name: {0: "batch", 1: "history"} for name in history_names}

    trie_axes: dict[str, dict[int, str]] = {"trie_leaf_items": {0: "items"}}
    for d in range(levels):
        trie_axes[f"trie_codes_{d}"] = {0: f"nodes_{d}", 1: f"width_{d}"}
        trie_axes[f"trie_offsets_{d}"] = {0: f"nodes_{d}"}
    trie = trie_tensors(build_trie(semantic_ids).as_feeds(), levels)
    _export(
        ConstrainedBeamSearch(model, beam_size), (*history, *trie), out_dir / "beam_search.onnx",
        [*history_names, *trie_input_names(levels)], ["item_indices", "scores"],
        history_axes | trie_axes | {"item_indices": {0: "batch"}, "scores": {0: "batch"}},
    )
    _export(
        EncoderGraph(model), history, out_dir / "encoder.onnx", history_names, EncoderGraph.output_names(model),
        history_axes | {"memory": {0: "batch", 1: "history"}, "item_bonus": {0: "batch"}},
    )
    with torch.no_grad():
        memory = model.encode(*history)
    prefix = torch.as_tensor(semantic_ids[: 2, : levels - 1], dtype=torch.long)
    _export(
        DecoderGraph(model), (memory, history[1], prefix), out_dir / "decoder.onnx",
        ["memory", "history_mask", "prefix_codes"], ["log_probs"],
        {"memory": {0: "batch", 1: "history"}, "history_mask": {0: "batch", 1: "history"},
         "prefix_codes": {0: "batch"}, "log_probs": {0: "batch"}},
    )


@dataclass
class ExportCheck:
    encoder_max_abs_diff: float
    decoder_max_abs_diff: float
    beam_score_max_abs_diff: float
    served_top10_equal: int
    users_checked: int

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def check_bundle(bundle_dir: Path, model: GenerativeRecommender, histories: list[np.ndarray]) -> ExportCheck:
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
    model: GenerativeRecommender,
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
) -> Path:
    """Everything the service needs, and a manifest with the sha256 of every file."""
    bundle_dir = out_dir / name / version
    bundle_dir.mkdir(parents=True, exist_ok=True)
    semantic_ids = np.asarray(semantic_ids, dtype=np.int32)
    np.save(bundle_dir / "semantic_ids.npy", semantic_ids)
    with (bundle_dir / "items.jsonl").open("w") as f:
        for item_id, title in zip(item_ids, titles):
            f.write(json.dumps({"item_id": item_id, "title": title}) + "\n")
    # Ties broken by item index so the ranking is reproducible.
    order = np.lexsort((np.arange(len(popularity_counts)), -np.asarray(popularity_counts)))
    np.save(bundle_dir / "popularity.npy", order.astype(np.int32))
    save_file({k: np.ascontiguousarray(v) for k, v in tokenizer_state.items()}, str(bundle_dir / "tokenizer.safetensors"))
    (bundle_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for extra in extra_files:  # e.g. the training curve, next to the model it produced
        shutil.copy2(extra, bundle_dir / extra.name)
    export_graphs(model, semantic_ids.astype(np.int64), beam_size, bundle_dir)
    # torch weights too (safetensors, not a pickle): to fine-tune or re-export without retraining.
    save_torch_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(bundle_dir / "recommender.safetensors"))

    files = sorted(p.name for p in bundle_dir.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": dataset,
        "tokenizer": tokenizer,
        "model": {"kind": "seq2seq", "config": model.cfg.to_dict()},
        "max_history": model.cfg.max_history,
        "beam_size": beam_size,
        "text_encoder": text_encoder,
        "metrics": metrics,
        "training": training,
        "files": file_digests(bundle_dir, files),
    }
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle_dir


def load_recommender(bundle_dir: Path) -> GenerativeRecommender:
    """The torch model a bundle was exported from."""
    from training.model import Seq2SeqConfig

    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    model = GenerativeRecommender(Seq2SeqConfig(**manifest["model"]["config"]))
    model.load_state_dict(load_torch_file(str(Path(bundle_dir) / "recommender.safetensors")))
    return model.eval()


def reexport_graphs(bundle_dir: Path) -> None:
    """Rebuilds a bundle's ONNX graphs in place from its recommender.safetensors with the current
    training/beam.py (a graph layout change needs no retraining), then rewrites the manifest's digests."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "recommender.safetensors").is_file():
        raise FileNotFoundError(f"{bundle_dir} has no recommender.safetensors: its graphs cannot be rebuilt")
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    export_graphs(load_recommender(bundle_dir), bundle.semantic_ids.astype(np.int64), bundle.beam_size, bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"] = file_digests(bundle_dir, manifest["files"])
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_demo_bundle(out_dir: Path, seed: int = 0, n_users: int = 300, n_items: int = 60) -> Path:
    """A complete bundle from a tiny synthetic catalog in seconds: for tests and examples."""
    from training.configs import get_config
    from training.data import make_synthetic_dataset, write_dataset
    from training.pipeline import run_pipeline

    out_dir = Path(out_dir)
    data_dir = write_dataset(make_synthetic_dataset(n_users, n_items, seed=seed), out_dir / "data")
    summary = run_pipeline(get_config("tiny", str(data_dir)), seed=seed, models_dir=out_dir / "models", progress=False)
    return Path(summary["bundle"])
