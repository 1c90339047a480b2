"""The plain twin of the graph's beam search: Python loops over a dict trie, one decoder call per step.

Slow and obviously correct; tests hold OnnxBeamEngine equal to it. Each step's log-probabilities are
renormalized over the prefix's valid children, as in the graph. Uses `encoder.onnx` and
`decoder.onnx`: the decoder returns log_probs (B, L, V) and step p reads row p. With an item head the
encoder also returns item_bonus (B, N), added to each found item's score before the final sort.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.bundle import Bundle
from service.constraints import Restriction
from service.engine import (
    HistoryTensorizer,
    check_graph_inputs,
    create_session,
    declared_history_inputs,
    resolve_providers,
)
from service.trie import PrefixTrie


class ReferenceBeamEngine:
    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: str | Sequence[str] = "auto",
        intra_op_threads: int = 0,
        max_history: int | None = None,
    ) -> None:
        wanted = resolve_providers(providers)
        self.encoder = create_session(bundle.file("encoder.onnx"), wanted, intra_op_threads)
        self.decoder = create_session(bundle.file("decoder.onnx"), wanted, intra_op_threads)
        self._history_inputs = declared_history_inputs(self.encoder)
        check_graph_inputs(self.encoder, self._history_inputs, "encoder.onnx")
        check_graph_inputs(
            self.decoder,
            {"memory": np.float32, "history_mask": np.bool_, "prefix_codes": np.int64},
            "decoder.onnx",
        )
        # Models with an item head rank the beam's candidates with it too (training/beam.py).
        self._encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        self.provider = self.decoder.get_providers()[0]
        self.beam_size = bundle.beam_size
        self.levels = bundle.levels
        config = bundle.manifest.model.get("config", {})
        self.head_candidates = int(config.get("item_head_candidates", 0)) if config.get("item_head") else 0
        self.semantic_ids = bundle.semantic_ids
        self.trie = PrefixTrie(bundle.semantic_ids)
        self._tensorize = HistoryTensorizer(bundle.semantic_ids, max_history or bundle.max_history)

    def search(self, histories: Sequence[np.ndarray], restriction: Restriction | None = None) -> tuple[np.ndarray, np.ndarray]:
        """restriction: only prefixes with an allowed item under them are followed (a set lookup per
        child: the obviously correct form of the graph's restricted trie)."""
        allowed = None if restriction is None else restriction.prefixes()
        feeds = self._tensorize(histories)
        history_mask = feeds["history_mask"]  # (B, H)
        outputs = self.encoder.run(self._encoder_outputs, {name: feeds[name] for name in self._history_inputs})
        memory = outputs[0]  # (B, H, D)
        item_bonus = outputs[1] if len(outputs) > 1 else None  # (B, N) with an item head
        item_indices = np.full((len(histories), self.beam_size), -1, dtype=np.int64)
        scores = np.full((len(histories), self.beam_size), -np.inf, dtype=np.float32)
        for b in range(len(histories)):
            found = [(self.trie.item_at(codes), score) for codes, score in self._search_one(memory[b : b + 1], history_mask[b : b + 1], allowed)]
            if item_bonus is not None:
                if self.head_candidates:
                    found += self._head_candidates(memory[b : b + 1], history_mask[b : b + 1], item_bonus[b],
                                                   {item for item, _ in found}, allowed)
                found = [(item, score + float(item_bonus[b, item])) for item, score in found]
                found.sort(key=lambda candidate: candidate[1], reverse=True)
                found = found[: self.beam_size]
            for j, (item, score) in enumerate(found):
                item_indices[b, j] = item
                scores[b, j] = score
        return item_indices, scores

    def _code_log_prob(self, log_probs: np.ndarray, codes: tuple[int, ...],
                       allowed: set[tuple[int, ...]] | None) -> float:
        """log_probs (L, V) of one teacher-forced decoder pass over `codes`: each level's log-prob
        renormalized over the prefix's valid children, as the beam scores it."""
        total = 0.0
        for step, code in enumerate(codes):
            prefix = codes[:step]
            children = self.trie.children(prefix)
            if allowed is not None:
                children = [c for c in children if prefix + (c,) in allowed]
            children_mass = float(np.logaddexp.reduce(log_probs[step, children].astype(np.float64)))
            total += float(log_probs[step, code]) - children_mass
        return total

    def _head_candidates(self, memory: np.ndarray, history_mask: np.ndarray, item_bonus: np.ndarray,
                         found: set[int], allowed: set[tuple[int, ...]] | None) -> list[tuple[int, float]]:
        """The item head's best items the beam did not find (item_head_candidates of them), each with
        its codes' renormalized log-probability (training/beam.py add_item_head_candidates)."""
        open_items = [i for i in range(len(item_bonus)) if i not in found
                      and (allowed is None or tuple(int(c) for c in self.semantic_ids[i]) in allowed)]
        best = sorted(open_items, key=lambda i: -float(item_bonus[i]))[: self.head_candidates]
        if not best:
            return []
        codes = self.semantic_ids[best].astype(np.int64)
        (log_probs,) = self.decoder.run(["log_probs"], {
            "memory": np.repeat(memory, len(best), axis=0),
            "history_mask": np.repeat(history_mask, len(best), axis=0),
            "prefix_codes": codes[:, :-1],
        })  # (c, L, V)
        return [(item, self._code_log_prob(log_probs[j], tuple(int(c) for c in codes[j]), allowed))
                for j, item in enumerate(best)]

    def _search_one(self, memory: np.ndarray, history_mask: np.ndarray,
                    allowed: set[tuple[int, ...]] | None = None) -> list[tuple[tuple[int, ...], float]]:
        """Beam search for one request: memory (1, H, D), history_mask (1, H); allowed: the prefixes
        it may follow (None: all)."""
        beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]  # (codes so far, sum of log-probs)
        for step in range(self.levels):
            prefix_codes = np.zeros((len(beams), self.levels - 1), dtype=np.int64)  # (n, L-1), zero beyond the prefix
            for i, (prefix, _) in enumerate(beams):
                prefix_codes[i, : len(prefix)] = prefix
            (log_probs,) = self.decoder.run(
                ["log_probs"],
                {
                    "memory": np.repeat(memory, len(beams), axis=0),
                    "history_mask": np.repeat(history_mask, len(beams), axis=0),
                    "prefix_codes": prefix_codes,
                },
            )  # (n, L, V)
            step_log_probs = log_probs[:, step]  # (n, V)
            candidates = []
            for i, (prefix, score) in enumerate(beams):
                children = self.trie.children(prefix)
                if allowed is not None:
                    children = [code for code in children if prefix + (code,) in allowed]
                # Renormalized over the valid children, as the graph does (training/beam.py).
                children_mass = float(np.logaddexp.reduce(step_log_probs[i, children].astype(np.float64)))
                candidates += [(prefix + (code,), score + float(step_log_probs[i, code]) - children_mass) for code in children]
            candidates.sort(key=lambda candidate: candidate[1], reverse=True)
            beams = candidates[: self.beam_size]
        return beams
