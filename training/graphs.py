"""ONNX graphs of the encoder-decoder kind ("seq2seq"): the constrained beam search the service runs,
and the encoder and decoder graphs its reference search uses."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from service.trie import build_trie
from training.batching import history_tensors, pad_histories
from training.beam import ConstrainedBeamSearch, DecoderGraph, EncoderGraph, trie_input_names, trie_tensors
from training.model import GenerativeRecommender

OPSET = 17


def export_onnx(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but handles the unrolled search
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=OPSET,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
        )
    path.write_bytes(buffer.getvalue())


def stamp_new_item_indices(path: Path) -> None:
    """Marks a beam search whose item head accepts item indices beyond the exported catalog (items the
    service adds later; rerank_with_item_head gives them a neutral bonus), so the service knows."""
    import onnx

    from service.engine import NEW_ITEM_INDICES_KEY

    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {NEW_ITEM_INDICES_KEY: "average-sibling collision code, neutral item-head bonus"})
    onnx.save(graph, str(path))


def export_seq2seq_graphs(model: GenerativeRecommender, semantic_ids: np.ndarray, beam_size: int, out_dir: Path) -> None:
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
    export_onnx(
        ConstrainedBeamSearch(model, beam_size), (*history, *trie), out_dir / "beam_search.onnx",
        [*history_names, *trie_input_names(levels)], ["item_indices", "scores"],
        history_axes | trie_axes | {"item_indices": {0: "batch"}, "scores": {0: "batch"}},
    )
    stamp_new_item_indices(out_dir / "beam_search.onnx")
    export_onnx(
        EncoderGraph(model), history, out_dir / "encoder.onnx", history_names, EncoderGraph.output_names(model),
        history_axes | {"memory": {0: "batch", 1: "history"}, "item_bonus": {0: "batch"}},
    )
    with torch.no_grad():
        memory = model.encode(*history)
    prefix = torch.as_tensor(semantic_ids[: 2, : levels - 1], dtype=torch.long)
    export_onnx(
        DecoderGraph(model), (memory, history[1], prefix), out_dir / "decoder.onnx",
        ["memory", "history_mask", "prefix_codes"], ["log_probs"],
        {"memory": {0: "batch", 1: "history"}, "history_mask": {0: "batch", 1: "history"},
         "prefix_codes": {0: "batch"}, "log_probs": {0: "batch"}},
    )
