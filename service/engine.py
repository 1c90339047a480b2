"""Batched constrained beam search: the exported one-call graph (`beam_search.onnx`) on onnxruntime.

One device call per micro-batch: encoder, the L decode steps, trie masking and top-k all run inside
the graph, with the trie arrays as inputs that stay resident (on the GPU when there is one).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, BundleError
from service.constraints import Restriction
from service.trie import TrieArrays, build_trie

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_PROVIDER_ALIASES = {"cuda": CUDA, "cpu": CPU, "tensorrt": "TensorrtExecutionProvider"}
_ORT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(bool)": np.bool_, "tensor(float)": np.float32}


class BeamEngine(Protocol):
    """What the batcher needs from an engine; OnnxBeamEngine and ReferenceBeamEngine both are one."""

    beam_size: int
    provider: str  # the execution provider actually running the model

    def search(self, histories: Sequence[np.ndarray], restriction: Restriction | None = None) -> tuple[np.ndarray, np.ndarray]:
        """histories: per request, int item indices oldest first (non-empty). restriction: search only
        its allowed items (service/constraints.py), for every request of the call.
        Returns item_indices int64 (B, beam) with -1 where no item, scores float32 (B, beam)."""
        ...


# The graphs' history inputs and their contract types; history_items only in models that embed item ids.
HISTORY_INPUTS = {"history_codes": np.int64, "history_mask": np.bool_, "history_items": np.int64}


class HistoryTensorizer:
    """Item-index histories -> the graphs' history feeds: history_codes (B, H, L) int64,
    history_mask (B, H) bool and history_items (B, H) int64 (padding = catalog size).

    H is always max_history, so a request's result does not depend on what else shares its batch.
    Each request is copied once, into an index matrix; a single gather then yields the codes, with a
    zero row appended to the code table so that padding gathers zeros.
    """

    def __init__(self, semantic_ids: np.ndarray, max_history: int, item_id_rows: int | None = None) -> None:
        """item_id_rows: the items the graph's item-id table has rows for (the bundle's N); an item
        added since (index >= N) is fed as the padding row N, so only its codes describe it."""
        n_items, levels = semantic_ids.shape
        self.pad_index = n_items
        self.item_id_rows = n_items if item_id_rows is None else item_id_rows
        self.max_history = max_history
        self._codes = np.zeros((n_items + 1, levels), dtype=np.int64)  # (N + 1, L), last row = padding
        self._codes[:n_items] = semantic_ids

    def __call__(self, histories: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        horizon = self.max_history
        items = np.full((len(histories), horizon), self.pad_index, dtype=np.int64)  # (B, H)
        lengths = np.empty(len(histories), dtype=np.int64)
        for i, history in enumerate(histories):  # the one copy of each request's history
            recent = history[-horizon:]
            lengths[i] = len(recent)
            if len(recent):
                items[i, horizon - len(recent):] = recent  # left-pad: most recent last
        history_mask = np.arange(horizon) >= (horizon - lengths)[:, None]  # (B, H)
        real = items[history_mask]
        if real.size and (real.min() < 0 or real.max() >= self.pad_index):
            raise ValueError(f"history item index out of range [0, {self.pad_index})")
        history_codes = self._codes[items]  # (B, H, L)
        if self.item_id_rows < self.pad_index:
            items = np.minimum(items, self.item_id_rows)
        return {"history_codes": history_codes, "history_mask": history_mask, "history_items": items}


def declared_history_inputs(session: ort.InferenceSession) -> dict[str, type]:
    """The history inputs this graph takes, with their contract types: history_items only when
    the model embeds item ids."""
    declared = {i.name for i in session.get_inputs()}
    return {name: dtype for name, dtype in HISTORY_INPUTS.items() if name != "history_items" or name in declared}


def resolve_providers(setting: str | Sequence[str]) -> list[str]:
    """'auto' -> CUDA first when this onnxruntime has it, then CPU; else the named ones that exist."""
    available = ort.get_available_providers()
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return [p for p in (CUDA, CPU) if p in available]
    names = [s.strip() for s in setting.split(",")] if isinstance(setting, str) else list(setting)
    wanted = [_PROVIDER_ALIASES.get(n.lower(), n) for n in names if n]
    chosen = [p for p in wanted if p in available]
    for missing in set(wanted) - set(chosen):
        log.warning("execution provider %s is not available in this onnxruntime (%s)", missing, available)
    if not chosen:
        raise ValueError(f"none of the execution providers {wanted} is available; onnxruntime has {available}")
    return chosen


def create_session(
    model_path: Path, providers: Sequence[str], intra_op_threads: int = 0, allow_spinning: bool = False
) -> ort.InferenceSession:
    """allow_spinning: onnxruntime's intra-op threads busy-wait between operators by default. In the
    service they share the cores with the event loop, Redis and the batcher, and spinning threads
    take CPU those need (on a shared 2-core machine, 2 spinning threads ran 3x slower than 2 idle-
    waiting ones), so the threads sleep when out of work unless asked otherwise."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3  # errors only; provider fallbacks are reported by the caller
    return ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))


def check_graph_inputs(session: ort.InferenceSession, expected: dict[str, type], graph: str) -> None:
    """Fail at load, naming the difference, when a graph's inputs drift from the contract."""
    declared = {i.name: i.type for i in session.get_inputs()}
    if set(declared) != set(expected):
        raise BundleError(f"{graph}: inputs {sorted(declared)} differ from the contract {sorted(expected)}")
    for name, dtype in expected.items():
        if _ORT_DTYPES.get(declared[name]) is not np.dtype(dtype).type:
            raise BundleError(f"{graph}: input {name} is {declared[name]}, the contract says {np.dtype(dtype)}")


def graph_trie_feeds(trie: TrieArrays, declared: dict[str, str]) -> dict[str, np.ndarray]:
    """The trie arrays in the layout and integer types the graph declares: a depth whose
    `trie_codes_{d}` input is int16 takes dense rows, int32 padded CSR (graphs exported before the
    dense rows take int32 everywhere). Values are checked to fit the declared types."""
    dense = [declared.get(f"trie_codes_{d}") == "tensor(int16)" for d in range(trie.levels)]
    feeds: dict[str, np.ndarray] = {}
    for name, array in trie.feeds_for(dense).items():
        dtype = _ORT_DTYPES.get(declared.get(name, ""))
        if dtype is None or not np.issubdtype(dtype, np.integer) or dtype is array.dtype.type:
            feeds[name] = np.ascontiguousarray(array)  # missing or odd inputs: check_graph_inputs names them
            continue
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise BundleError(f"beam_search.onnx: trie input {name} is {np.dtype(dtype)}, too narrow for this catalog")
        feeds[name] = np.ascontiguousarray(array, dtype=dtype)
    return feeds


# What a re-exported beam_search.onnx says in its metadata when its item head takes item indices
# beyond the catalog it was exported with (training/graphs.py): such items get a neutral bonus.
NEW_ITEM_INDICES_KEY = "genrec.new_item_indices"


@dataclass(frozen=True)
class EngineCatalog:
    """What a batch reads of the catalog, swapped whole (service/catalog.py builds a new one per change)."""

    version: int
    tensorize: HistoryTensorizer
    trie_feeds: dict[str, np.ndarray]  # CPU feeds
    resident_trie: dict[str, ort.OrtValue]  # the same on the device (IOBinding)


def new_items_refused(session: ort.InferenceSession, bundle: Bundle) -> str:
    """Why this graph cannot serve items added after export ("" when it can): an item head scores
    items by index over the exported catalog, and only re-exported graphs guard indices beyond it."""
    if not bundle.manifest.model.get("config", {}).get("item_head"):
        return ""
    if session.get_modelmeta().custom_metadata_map.get(NEW_ITEM_INDICES_KEY):
        return ""
    return (f"beam_search.onnx of {bundle.name}/{bundle.version} has an item head exported before new items "
            f"were supported; rebuild its graphs with `genrec export --bundle {bundle.path}` to add items")


class OnnxBeamEngine:
    """Runs `beam_search.onnx`: one session.run per batch."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: str | Sequence[str] = "auto",
        intra_op_threads: int = 0,
        max_history: int | None = None,
        use_io_binding: bool | None = None,
        busy_intra_op_threads: int | None = None,
    ) -> None:
        """busy_intra_op_threads: on CPU, the threads of a call that starts while another call is
        computing (a second session of the same graph); None or equal to intra_op_threads: one session."""
        wanted = resolve_providers(providers)
        self.session = create_session(bundle.file("beam_search.onnx"), wanted, intra_op_threads)
        self.provider = self.session.get_providers()[0]
        if wanted[0] != self.provider:
            log.warning("asked for %s but onnxruntime runs beam_search.onnx on %s", wanted[0], self.provider)
        # A call computing alone may use every core; calls that overlap split them, since onnxruntime's
        # threads waking for each of ~1,200 small operators cost more than a second core gives there
        # (2 workers on 2 cores, batches of 1-16: 1.2-1.5x the throughput with one thread each).
        self.busy_session = self.session
        if self.provider == CPU and busy_intra_op_threads and busy_intra_op_threads != intra_op_threads:
            self.busy_session = create_session(bundle.file("beam_search.onnx"), wanted, busy_intra_op_threads)
        self._calls_in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.beam_size = bundle.beam_size
        self.max_history = max_history or bundle.max_history
        self.trained_items = bundle.num_items  # rows of the graph's item tables (history ids, item head)
        self._declared = {i.name: i.type for i in self.session.get_inputs()}
        self._history_inputs = declared_history_inputs(self.session)
        self.new_items_refused = new_items_refused(self.session, bundle)
        # On a GPU the trie lives on the device, bound by IOBinding, so a batch only moves its history
        # tensors. On CPU plain feeds cost nothing extra.
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.uses_io_binding = self.device == "cuda" if use_io_binding is None else use_io_binding
        host_feeds = self._trie_feeds(bundle.semantic_ids, None)
        expected = self._history_inputs | {n: a.dtype.type for n, a in host_feeds.items()}
        check_graph_inputs(self.session, expected, "beam_search.onnx")
        self.trie_nbytes = sum(a.nbytes for a in host_feeds.values())
        self._catalog = self._engine_catalog(bundle.semantic_ids, host_feeds, 0)

    def _trie_feeds(self, semantic_ids: np.ndarray, live: np.ndarray | None) -> dict[str, np.ndarray]:
        """The trie inputs of the live items, leaves mapped back to their item indices."""
        live_items = np.arange(len(semantic_ids)) if live is None else np.flatnonzero(live)
        trie = build_trie(semantic_ids[live_items])
        if live is not None:
            trie = replace(trie, leaf_items=live_items[trie.leaf_items].astype(np.int32))
        return graph_trie_feeds(trie, self._declared)

    def prepare_catalog(self, semantic_ids: np.ndarray, live: np.ndarray | None = None, version: int = 0) -> EngineCatalog:
        """The history code table and trie inputs of a catalog (service/catalog.py calls it off the
        request path): semantic_ids (M, L) of every item index, live (M,) bool the ones the beam may
        return (None: all). Indices beyond the bundle's N are items added since export."""
        if len(semantic_ids) > self.trained_items and self.new_items_refused:
            raise ValueError(self.new_items_refused)
        return self._engine_catalog(semantic_ids, self._trie_feeds(semantic_ids, live), version)

    def _engine_catalog(self, semantic_ids: np.ndarray, feeds: dict[str, np.ndarray], version: int) -> EngineCatalog:
        resident = ({n: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for n, a in feeds.items()}
                    if self.uses_io_binding else {})
        tensorize = HistoryTensorizer(semantic_ids, self.max_history, item_id_rows=self.trained_items)
        return EngineCatalog(version, tensorize, {} if self.uses_io_binding else feeds, resident)

    def swap_catalog(self, catalog: EngineCatalog) -> None:
        """One reference assignment: a batch reads the catalog once, so it sees the old or the new one whole."""
        self._catalog = catalog

    @property
    def catalog_version(self) -> int:
        return self._catalog.version

    def search(self, histories: Sequence[np.ndarray], restriction: Restriction | None = None) -> tuple[np.ndarray, np.ndarray]:
        catalog = self._catalog  # this batch's one snapshot of the catalog (codes table and trie)
        feeds = catalog.tensorize(histories)
        history = {name: feeds[name] for name in self._history_inputs}
        # A restricted search feeds the allowed items' trie (built once per restriction, in this thread).
        restricted = None if restriction is None else restriction.built(
            ("graph", id(self)), lambda: graph_trie_feeds(restriction.trie(), self._declared))
        if self.uses_io_binding:
            binding = self.session.io_binding()
            for name, array in history.items():
                binding.bind_cpu_input(name, array)
            if restricted is None:
                for name, value in catalog.resident_trie.items():
                    binding.bind_ortvalue_input(name, value)
            else:  # a restricted trie is copied to the device per call
                for name, array in restricted.items():
                    binding.bind_cpu_input(name, array)
            binding.bind_output("item_indices", "cpu")
            binding.bind_output("scores", "cpu")
            self.session.run_with_iobinding(binding)
            item_indices, scores = binding.copy_outputs_to_cpu()
        else:
            with self._in_flight_lock:
                self._calls_in_flight += 1
                session = self.session if self._calls_in_flight == 1 else self.busy_session
            try:
                trie = catalog.trie_feeds if restricted is None else restricted
                item_indices, scores = session.run(["item_indices", "scores"], history | trie)
            finally:
                with self._in_flight_lock:
                    self._calls_in_flight -= 1
        expected_shape = (len(histories), self.beam_size)
        if item_indices.shape != expected_shape or scores.shape != expected_shape:
            raise RuntimeError(f"beam_search.onnx returned {item_indices.shape}/{scores.shape}, expected {expected_shape}")
        return item_indices.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)
