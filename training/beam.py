"""Constrained beam search as one torch module, exported whole to ONNX (`beam_search.onnx`).

The L decode steps are unrolled (L is small and fixed), trie masking is one fixed-width gather
per step (see service/trie.py for the layout), and the cross-attention keys and values are
computed once per request and shared by its beams. The offline evaluator runs this same module,
so what is measured offline is what is served.
"""
from __future__ import annotations

import torch
from torch import nn

from training.model import NEG, GenerativeRecommender


class ConstrainedBeamSearch(nn.Module):
    def __init__(self, model: GenerativeRecommender, beam_size: int) -> None:
        super().__init__()
        self.model = model
        self.beam_size = beam_size

    def forward(self, history_codes: torch.Tensor, history_mask: torch.Tensor, *trie: torch.Tensor):
        """history_codes (B, H, L) int64, history_mask (B, H) bool, then the trie arrays in
        graph-input order: codes_0..codes_{L-1}, offsets_0..offsets_{L-1}, leaf_items.
        Returns item_indices (B, beam) int64 (-1 where no valid item) and scores (B, beam)."""
        model, levels, beam = self.model, self.model.cfg.levels, self.beam_size
        trie_codes, trie_offsets, leaf_items = trie[:levels], trie[levels : 2 * levels], trie[2 * levels]
        b = history_codes.shape[0]
        memory = model.encode(history_codes, history_mask)
        cross_kv = model.cross_keys_values(memory)  # per layer (B, h, H, hd): shared by the beams
        cross_bias = torch.zeros(history_mask.shape, device=memory.device).masked_fill(~history_mask, NEG)
        cross_bias = cross_bias[:, None, None, :]  # (B, 1, 1, H)

        node = torch.zeros(b, 1, dtype=torch.long, device=memory.device)  # the root, one live beam
        scores = torch.zeros(b, 1, device=memory.device)
        prefix = None  # (B, k, step) codes chosen so far
        batch_arange = torch.arange(b, device=memory.device)[:, None]
        for step in range(levels):
            k = node.shape[1]
            # ONNX Reshape reads a 0 in the target shape as "keep", so step 0 takes a zero-width slice.
            flat_prefix = history_codes[:, 0, :0] if prefix is None else prefix.reshape(b * k, step)
            hidden = model.decode(flat_prefix, cross_kv, cross_bias, groups=k)
            log_probs = model.level_log_probs(hidden[:, -1], step).view(b, k, -1)  # (B, k, V)
            child_codes = trie_codes[step][node].long()  # (B, k, W)
            width = child_codes.shape[-1]
            valid = child_codes >= 0
            candidate = log_probs.gather(-1, child_codes.clamp(min=0))  # (B, k, W)
            candidate = (scores[..., None] + candidate).masked_fill(~valid | (scores[..., None] <= NEG / 2), NEG)
            flat = candidate.reshape(b, k * width)
            # Pad so top-k always has `beam` columns, even when the catalog has fewer paths.
            flat = torch.cat([flat, torch.full((b, beam), NEG, device=flat.device)], dim=1)
            scores, chosen = flat.topk(beam, dim=1)  # (B, beam)
            real = chosen < k * width
            chosen = torch.where(real, chosen, torch.zeros_like(chosen))
            parent = torch.div(chosen, width, rounding_mode="floor")
            slot = chosen - parent * width
            parent_node = node[batch_arange, parent]
            code = child_codes[batch_arange, parent, slot]
            node = trie_offsets[step][parent_node].long() + slot
            node = torch.where(scores > NEG / 2, node, torch.zeros_like(node))
            code = code.clamp(min=0)[..., None]
            prefix = code if prefix is None else torch.cat([prefix[batch_arange, parent], code], dim=-1)
        live = scores > NEG / 2
        items = torch.where(live, leaf_items[node].long(), torch.full_like(node, -1))
        return items, scores


class EncoderGraph(nn.Module):
    """history -> memory; for the reference beam search in the service."""

    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, history_codes: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(history_codes, history_mask)


class DecoderGraph(nn.Module):
    """memory + chosen codes -> log-probabilities of every level's code (B, L, V)."""

    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor, history_mask: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        model = self.model
        cross_bias = torch.zeros(history_mask.shape, device=memory.device).masked_fill(~history_mask, NEG)
        hidden = model.decode(prefix_codes, model.cross_keys_values(memory), cross_bias[:, None, None, :], groups=1)
        return torch.stack([model.level_log_probs(hidden[:, lvl], lvl) for lvl in range(model.cfg.levels)], dim=1)


def trie_tensors(trie_feeds: dict, levels: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """service.trie.TrieArrays.as_feeds() -> tensors in the graph's input order."""
    return [torch.as_tensor(trie_feeds[name], device=device) for name in trie_input_names(levels)]


def trie_input_names(levels: int) -> list[str]:
    return [f"trie_codes_{d}" for d in range(levels)] + [f"trie_offsets_{d}" for d in range(levels)] + ["trie_leaf_items"]
