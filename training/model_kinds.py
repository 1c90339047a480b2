"""Model kinds: each owns its torch module and config, its one-step decode (a method of the module,
used by the beam search in evaluation, export and serving) and its graph export.

Adding a kind = a module with the beam search's decoder interface (training/beam.py
ConstrainedBeamSearch: cfg.levels / max_codebook / history_inputs, encode, cross_keys_values,
step_input, decode_newest, level_log_probs; item_log_probs with an item head), an export function,
and a line in MODEL_KINDS. The bundle's manifest names the kind; load_recommender rebuilds it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from training.graphs import export_seq2seq_graphs
from training.model import GenerativeRecommender, Seq2SeqConfig
from training.store_model import StoreConfig, StoreModel, export_store_graphs


@dataclass(frozen=True)
class ModelKind:
    name: str
    config: type  # dataclass with to_dict(); built from the manifest's model.config
    module: type  # nn.Module built from the config
    export_graphs: Callable[[nn.Module, np.ndarray, int, Path], None]  # (model, semantic_ids, beam_size, out_dir)


MODEL_KINDS: dict[str, ModelKind] = {
    "seq2seq": ModelKind("seq2seq", Seq2SeqConfig, GenerativeRecommender, export_seq2seq_graphs),
    # STORE: the same K2K graphs, plus t2k.onnx and text_tokenizer.json (training/store_model.py)
    "store": ModelKind("store", StoreConfig, StoreModel, export_store_graphs),
}


def model_kind(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise KeyError(f"unknown model kind {name!r}; known: {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[name]


def build_model(kind: str, cfg: Any) -> nn.Module:
    return model_kind(kind).module(cfg)


def kind_of(model: nn.Module) -> str:
    """The registered kind whose module `model` is."""
    for kind in MODEL_KINDS.values():
        if type(model) is kind.module:
            return kind.name
    raise KeyError(f"{type(model).__name__} is not a registered model kind's module")
