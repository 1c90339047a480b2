"""Constrained beam search as one torch module, exported whole to ONNX (`beam_search.onnx`).

The L decode steps are unrolled (L is small and fixed). Per step:
- the decoder runs on the newest code only: each layer's self-attention keys and values of the
  earlier codes are cached and reordered with the surviving beams (a KV cache), so step p costs one
  token, not p + 1;
- the cross-attention keys and values are computed once per request from the encoder memory and
  shared by its beams (beams are folded into the query axis, never copied);
- trie masking is one fixed-width gather per step (see service/trie.py): on the leading depths a
  dense row per live node that already maps every code to its child slot, on the deeper ones a
  padded CSR row of child codes scattered onto the same fixed (beams, V + 1) grid; scoring and one
  top-k run on that grid, so a step costs about the same whatever the catalog size.
The offline evaluator runs this same module, so what is measured offline is what is served.
"""
from __future__ import annotations

import torch
from torch import nn

from training.model import KV, NEG, GenerativeRecommender


def slot_grid(trie_codes: torch.Tensor, node: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, k, grid) int64: for each live node (B, k) and code c, the slot of code c among the
    node's children in column c + 1, -1 where c is no child (column 0 is a sink, never valid).

    The depth's layout comes from the table's type (service/trie.py): int16 dense rows are already
    this grid, one row gather each; int32 padded CSR rows of child codes are scattered into it."""
    k = node.shape[1]
    if trie_codes.dtype == torch.int16:  # dense rows (nodes, C + 1), C <= V: gather, then pad to the grid
        rows = trie_codes[node].long()  # (B, k, C + 1)
        return nn.functional.pad(rows, (0, grid - rows.shape[-1]), value=-1)
    child_codes = trie_codes[node].long()  # (B, k, W), the fixed-width CSR gather
    width = child_codes.shape[-1]
    # Flat positions (b * k + j) * grid + code + 1, the -1 padding landing in column 0: a 1-D
    # scatter is the cheapest form onnxruntime runs.
    sequences = node.numel()
    base = torch.arange(sequences, device=node.device).reshape(-1, k, 1) * grid + 1
    slots = torch.arange(width, device=node.device).expand_as(child_codes)
    flat = torch.full((sequences * grid,), -1, dtype=torch.long, device=node.device)
    flat = flat.scatter(0, (child_codes + base).reshape(-1), slots.reshape(-1))
    return flat.reshape(-1, k, grid)


def renormalize_over_children(log_probs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log_probs (B, k, V) and their slot grid (B, k, G >= V + 1, slot_grid) -> (log-probabilities
    renormalized over each node's valid children on the grid, code c in column c + 1; the additive
    mask, 0 on valid children and NEG elsewhere), both (B, k, G)."""
    padded = nn.functional.pad(log_probs, (1, slots.shape[-1] - log_probs.shape[-1] - 1), value=NEG)  # sink, spare: NEG
    # An additive mask, not Where: onnxruntime's Where branches per element, and a pattern of valid
    # children it cannot predict (the dense nodes of a 10M-item catalog) made each one 5x slower.
    invalid = (slots < 0).to(log_probs.dtype) * NEG
    # log_softmax over the masked row is the renormalization (x - logsumexp of the valid x) in one
    # vectorized kernel; onnxruntime's ReduceLogSumExp took 11% of a batch-64 search.
    return (padded + invalid).log_softmax(-1), invalid


def constrained_step(
    log_probs: torch.Tensor,  # (B, k, V) log-probabilities of this level's code, per live beam
    scores: torch.Tensor,  # (B, k) sum of log-probs so far; <= NEG / 2 marks a dead beam
    node: torch.Tensor,  # (B, k) int64 trie node of each beam at this depth
    trie_codes: torch.Tensor,  # this depth's table: dense rows (int16) or padded CSR (int32)
    trie_offsets: torch.Tensor,  # (nodes,) id of each node's first child at the next depth
    beam: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of trie-constrained beam search.

    The live nodes' children are laid on a fixed grid of V + 1 columns per beam (slot_grid);
    scoring and one top-k run on that grid, so the step costs about the same for 10 thousand or
    10 million items (exactly the same on dense-row depths).

    Each beam's log-probabilities are renormalized over its valid children (the mass the model puts
    on codes the catalog does not continue with is dropped), so a node with one child adds exactly 0
    and needs no decoder call (ConstrainedBeamSearch skips those at the last level). On Beauty this
    also ranked better than the raw log-probabilities (test R@10 .0522 against .0501, same bundle).

    Returns (scores (B, beam), node (B, beam) at the next depth, code (B, beam) chosen, rows
    (B * beam,) the flat index b * k + parent of each new beam's parent). Dead beams get node 0,
    code 0 and a score <= NEG / 2."""
    _, k, v = log_probs.shape
    grid = max(v + 1, beam)  # >= beam columns, so top-k always has room even at the root
    slots = slot_grid(trie_codes, node, grid)  # (B, k, grid)
    renormalized, invalid = renormalize_over_children(log_probs, slots)
    candidate = scores[..., None] + renormalized + invalid
    scores, chosen = candidate.reshape(-1, k * grid).topk(beam, dim=1)  # (B, beam)
    scores = scores.clamp(min=NEG)  # dead beams score exactly NEG, whatever the masks added
    parent = torch.div(chosen, grid, rounding_mode="floor")
    slot = slots.reshape(-1, k * grid).gather(1, chosen)
    first_row = torch.arange(node.shape[0], device=node.device)[:, None] * k  # (B, 1)
    rows = (first_row + parent).reshape(-1)  # (B * beam,)
    parent_node = node.reshape(-1).index_select(0, rows).reshape(-1, beam)
    live = scores > NEG / 2
    zero = torch.zeros((), dtype=torch.long, device=node.device)
    node = torch.where(live, trie_offsets[parent_node].long() + slot, zero)
    code = torch.where(live, chosen - parent * grid - 1, zero)
    return scores, node, code, rows


class ConstrainedStep(nn.Module):
    """One step alone (gather + scatter + top-k), exported by the serving benchmark to time how a
    step scales with the catalog."""

    def __init__(self, beam_size: int) -> None:
        super().__init__()
        self.beam_size = beam_size

    def forward(self, log_probs, scores, node, trie_codes, trie_offsets):
        scores, node, code, _ = constrained_step(log_probs, scores, node, trie_codes, trie_offsets, self.beam_size)
        return scores, node, code


def rerank_with_item_head(
    model: GenerativeRecommender, user_state: torch.Tensor, items: torch.Tensor, scores: torch.Tensor,
    log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The beam's candidates ranked by codes' log-probability + item_head_weight * the item head's
    log-probability. user_state (B, D); items (B, k), -1 for no item; scores (B, k); log_probs the
    head's (B, N) when already computed. Dead beams keep their score (<= NEG / 2), so they stay last.
    -> (items, scores), best first."""
    if log_probs is None:
        log_probs = model.item_log_probs(user_state)  # (B, N) over the catalog the model was trained on
    trained = (items >= 0) & (items < log_probs.shape[1])
    bonus = log_probs.gather(1, items.clamp(0, log_probs.shape[1] - 1))
    # An item added after export (index >= N, service/catalog.py) has no row: it takes the mean bonus
    # of the beam's trained items, so the head neither lifts nor buries it among them.
    neutral = (bonus * trained).sum(1, keepdim=True) / trained.sum(1, keepdim=True).clamp(min=1)
    bonus = torch.where(trained, bonus, neutral)
    combined = torch.where(items >= 0, scores + model.cfg.item_head_weight * bonus, scores)
    combined, order = combined.topk(items.shape[1], dim=1)
    return items.gather(1, order), combined


def model_candidates(model: nn.Module) -> int:
    """How many item-head candidates the search adds (0 for models without the setting)."""
    return int(getattr(model.cfg, "item_head_candidates", 0)) if getattr(model.cfg, "item_head", False) else 0


class ConstrainedBeamSearch(nn.Module):
    """The search over any model kind with the decoder interface (training/model_kinds.py): cfg,
    encode, cross_keys_values, step_input, decode_newest, level_log_probs (item_log_probs with an
    item head); the one-step decode is the model's own."""

    def __init__(self, model: GenerativeRecommender, beam_size: int, use_item_head: bool = True) -> None:
        """use_item_head=False ranks by the codes alone even when the model has an item head."""
        super().__init__()
        self.model = model
        self.beam_size = beam_size
        self.use_item_head = use_item_head and model.cfg.item_head

    def forward(self, *inputs: torch.Tensor):
        """The history inputs (model.cfg.history_inputs: history_codes (B, H, L) int64, history_mask
        (B, H) bool[, history_items (B, H) int64]), then the trie arrays in graph-input order:
        codes_0..codes_{L-1}, offsets_0..offsets_{L-1}, leaf_items.
        Returns item_indices (B, beam) int64 (-1 where no valid item) and scores (B, beam)."""
        model, levels, beam = self.model, self.model.cfg.levels, self.beam_size
        n_history = len(model.cfg.history_inputs)
        history, trie = inputs[:n_history], inputs[n_history:]
        trie_codes, trie_offsets, leaf_items = trie[:levels], trie[levels : 2 * levels], trie[2 * levels]
        history_mask = history[1]
        b = history_mask.shape[0]
        memory = model.encode(*history)
        # Per layer, keys transposed to (B, h, hd, H) and values (B, h, H, hd): once per request,
        # shared by its beams.
        memory_kv = model.cross_keys_values(memory)
        cross_kv = [(key.transpose(-1, -2), value) for key, value in memory_kv]
        cross_bias = torch.zeros(history_mask.shape, device=memory.device).masked_fill(~history_mask, NEG)
        cross_bias = cross_bias[:, None, None, :]  # (B, 1, 1, H)

        node = torch.zeros(b, 1, dtype=torch.long, device=memory.device)  # the root, one live beam
        scores = torch.zeros(b, 1, device=memory.device)
        code = node  # unused at step 0
        self_kv: list[KV] = []
        for step in range(levels):
            k = node.shape[1]
            x = model.step_input(step, code.reshape(-1), memory[:, -1])  # (B * k, D)
            if step == levels - 1 and step > 0:
                log_probs = self.last_level_log_probs(x, self_kv, cross_kv, cross_bias, node, trie_codes[step])
                log_probs = self.new_items_as_average_siblings(log_probs, node, trie_codes[step], trie_offsets[step],
                                                               leaf_items)
            else:
                hidden, self_kv = model.decode_newest(x, self_kv, cross_kv, cross_bias, groups=k)
                log_probs = model.level_log_probs(hidden, step).reshape(-1, k, model.cfg.max_codebook)  # (B, k, V)
            scores, node, code, rows = constrained_step(log_probs, scores, node, trie_codes[step], trie_offsets[step], beam)
            if step + 1 < levels:  # the new beams inherit their parents' cached keys and values
                self_kv = [(key.index_select(0, rows), value.index_select(0, rows)) for key, value in self_kv]
        live = scores > NEG / 2
        items = torch.where(live, leaf_items[node].long(), torch.full_like(node, -1))
        if self.use_item_head:
            head = model.item_log_probs(memory[:, -1])  # (B, N)
            if model_candidates(model) > 0:
                items, scores = self.add_item_head_candidates(items, scores, head, memory, memory_kv, cross_bias,
                                                              trie_codes, trie_offsets, leaf_items)
            items, scores = rerank_with_item_head(model, memory[:, -1], items, scores, head)
            items, scores = items[:, :beam], scores[:, :beam]
        return items, scores

    def add_item_head_candidates(
        self, items: torch.Tensor, scores: torch.Tensor, head: torch.Tensor, memory: torch.Tensor,
        memory_kv: list[KV], cross_bias: torch.Tensor,
        trie_codes: list[torch.Tensor], trie_offsets: list[torch.Tensor], leaf_items: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """items/scores (B, k) from the beam, head (B, N) the item head's log-probabilities, memory_kv
        and cross_bias the search's cross-attention keys/values (as cross_keys_values returns them) and
        mask -> (B, k + c): plus the head's best c trained items among the trie's leaves (the live
        catalog, any restriction applied) that the beam did not find, each with its codes'
        log-probability from one teacher-forced decoder pass, renormalized over the trie's valid
        children level by level exactly as constrained_step scores a beam."""
        model, c = self.model, model_candidates(self.model)
        b, n = items.shape[0], model.cfg.item_count
        # Items the trie holds (column n collects new items and padding), minus the beam's own.
        leaf_rows = torch.where((leaf_items >= 0) & (leaf_items < n), leaf_items.long(), torch.full_like(leaf_items, n).long())
        in_trie = torch.zeros(n + 1, device=head.device).scatter(0, leaf_rows, torch.ones_like(leaf_rows, dtype=head.dtype))
        beam_rows = torch.where((items >= 0) & (items < n), items, torch.full_like(items, n))
        in_beam = torch.zeros(b, n + 1, device=head.device).scatter(1, beam_rows, torch.ones_like(beam_rows, dtype=head.dtype))
        open_rows = (in_trie[None, :n] > 0) & (in_beam[:, :n] < 1)
        head_scores, extra = (head + (~open_rows).to(head.dtype) * NEG).topk(min(c, n), dim=1)  # (B, c)
        c = extra.shape[1]
        codes = model.item_codes[extra.reshape(-1)]  # (B * c, L)
        newest = memory[:, -1, None].expand(-1, c, -1).reshape(b * c, -1)
        hidden = model.decode(codes[:, :-1], newest, memory_kv, cross_bias, groups=c)  # (B * c, L, D)
        node = torch.zeros(b, c, dtype=torch.long, device=memory.device)
        code_scores = torch.zeros(b, c, device=memory.device)
        for step in range(model.cfg.levels):
            log_probs = model.level_log_probs(hidden[:, step], step).reshape(b, c, -1)  # (B, c, V)
            if step == model.cfg.levels - 1:
                log_probs = self.new_items_as_average_siblings(log_probs, node, trie_codes[step], trie_offsets[step],
                                                               leaf_items)
            slots = slot_grid(trie_codes[step], node, log_probs.shape[-1] + 1)  # (B, c, V + 1)
            renormalized, _ = renormalize_over_children(log_probs, slots)
            column = codes[:, step].reshape(b, c, 1) + 1
            code_scores = code_scores + renormalized.gather(2, column)[..., 0]
            node = trie_offsets[step][node].long() + slots.gather(2, column)[..., 0].clamp(min=0)
        live = head_scores > NEG / 2  # fewer open items than c: the rest stay dead
        extra = torch.where(live, extra, torch.full_like(extra, -1))
        code_scores = torch.where(live, code_scores, torch.full_like(code_scores, NEG))
        return torch.cat([items, extra], dim=1), torch.cat([scores, code_scores], dim=1)

    def last_level_log_probs(
        self, x: torch.Tensor, self_kv: list[KV], cross_kv: list[KV], cross_bias: torch.Tensor,
        node: torch.Tensor, trie_codes: torch.Tensor,
    ) -> torch.Tensor:
        """The last level's log-probabilities (B, k, V), the decoder run only for beams whose node has
        more than one child. The others get zeros: constrained_step renormalizes over the valid
        children, so a lone child adds exactly 0 either way. (Most last-level nodes tell apart items
        that share their other codes: on Beauty 97.6% have one child.) x (B * k, D), the newest
        position's input; self_kv per layer (B * k, h, t, hd); node (B, k) at the last depth."""
        model = self.model
        k = node.shape[1]
        children = (trie_codes[node] >= 0).sum(-1)  # (B, k): padded CSR rows pad with -1, dense rows mark no child -1
        rows = torch.nonzero(children.reshape(-1) > 1).reshape(-1)  # (R,) beams that need the decoder
        request = torch.div(rows, k, rounding_mode="floor")
        hidden, _ = model.decode_newest(
            x.index_select(0, rows),
            [(key.index_select(0, rows), value.index_select(0, rows)) for key, value in self_kv],
            [(key.index_select(0, request), value.index_select(0, request)) for key, value in cross_kv],
            cross_bias.index_select(0, request), groups=1,
        )
        computed = model.level_log_probs(hidden, model.cfg.levels - 1)  # (R, V)
        v = computed.shape[-1]
        log_probs = torch.zeros(x.shape[0], v, dtype=computed.dtype, device=x.device)
        log_probs = log_probs.scatter(0, rows[:, None].expand(-1, v), computed)
        return log_probs.reshape(-1, k, v)


    def new_items_as_average_siblings(
        self, log_probs: torch.Tensor, node: torch.Tensor, trie_codes: torch.Tensor, trie_offsets: torch.Tensor,
        leaf_items: torch.Tensor,
    ) -> torch.Tensor:
        """At the collision level, a child that is an item added after training (leaf item index >=
        the model's item_count, service/catalog.py) gets the log of its trained siblings' mean
        probability instead of its code's own: the collision code only numbers items sharing the
        other codes, and a code no item held in training was only ever pushed down. log_probs
        (B, k, V); node (B, k) at the last depth. Unchanged when every leaf is a trained item."""
        n_trained = self.model.cfg.item_count
        if n_trained < 1:
            return log_probs
        _, k, v = log_probs.shape
        slots = slot_grid(trie_codes, node, v + 1)[..., 1:]  # (B, k, V): slot of code c, -1 where no child
        leaf = trie_offsets[node].long()[..., None] + slots.clamp(min=0)
        item = leaf_items[leaf.clamp(max=leaf_items.shape[0] - 1)].long()
        new = (slots >= 0) & (item >= n_trained)
        trained = (slots >= 0) & (item < n_trained)
        siblings = torch.where(trained, log_probs, torch.full_like(log_probs, NEG)).logsumexp(-1, keepdim=True)
        average = siblings - trained.sum(-1, keepdim=True).clamp(min=1).to(log_probs.dtype).log()
        average = torch.where(trained.any(-1, keepdim=True), average, torch.zeros_like(average))
        return torch.where(new, average.expand_as(log_probs), log_probs)


class EncoderGraph(nn.Module):
    """history -> memory, and with an item head item_bonus (B, N): item_head_weight * the item head's
    log-probabilities at the newest history item, what the beam search adds to each found item's
    score; for the reference beam search in the service."""

    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def output_names(model: GenerativeRecommender) -> list[str]:
        return ["memory"] + (["item_bonus"] if model.cfg.item_head else [])

    def forward(self, *history: torch.Tensor):
        """The history inputs in model.cfg.history_inputs order."""
        memory = self.model.encode(*history)
        if not self.model.cfg.item_head:
            return memory
        return memory, self.model.cfg.item_head_weight * self.model.item_log_probs(memory[:, -1])


class DecoderGraph(nn.Module):
    """memory + chosen codes -> log-probabilities of every level's code (B, L, V)."""

    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor, history_mask: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        model = self.model
        cross_bias = torch.zeros(history_mask.shape, device=memory.device).masked_fill(~history_mask, NEG)
        # Histories are left-padded: the last position is the newest item.
        hidden = model.decode(prefix_codes, memory[:, -1], model.cross_keys_values(memory), cross_bias[:, None, None, :],
                              groups=1)
        return torch.stack([model.level_log_probs(hidden[:, lvl], lvl) for lvl in range(model.cfg.levels)], dim=1)


def trie_tensors(trie_feeds: dict, levels: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """service.trie.TrieArrays.as_feeds() -> tensors in the graph's input order."""
    return [torch.as_tensor(trie_feeds[name], device=device) for name in trie_input_names(levels)]


def trie_input_names(levels: int) -> list[str]:
    return [f"trie_codes_{d}" for d in range(levels)] + [f"trie_offsets_{d}" for d in range(levels)] + ["trie_leaf_items"]
