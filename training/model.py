"""T5-style encoder-decoder that generates the next item's semantic ID.

The encoder reads the history one token per item (the sum of the item's code embeddings), with
causal attention limited to the last `max_history` items and a learned relative-position bias, as
T5 does. Causal attention makes the state at position t depend on items <= t only, so one pass
over a user's sequence gives the encoder output of every training prefix; the decoder then
generates the L codes of every next item of the sequence at once (teacher forcing). At serving
time the same encoder reads the history and the decoder generates L codes under beam search.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e9  # finite "minus infinity": keeps softmax and score sums free of NaN
KV = tuple[torch.Tensor, torch.Tensor]  # one layer's attention keys and values


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, but on CPUs the keep mask comes from random bytes (eight per 64-bit draw), so the
    keep probability is rounded to a multiple of 1/256. Torch's CPU bernoulli_ costs about ten
    multiplies per element: a quarter of a training step of this model (benchmarks/bench_training.py)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    drop_below = round(p * 256)
    if drop_below >= 256:
        return torch.zeros_like(x)
    words = torch.empty((x.numel() + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    random_bytes = words.view(torch.uint8)[: x.numel()].view(x.shape)
    keep = (random_bytes >= drop_below).to(x.dtype).mul_(256 / (256 - drop_below))
    return x * keep


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


@dataclass
class Seq2SeqConfig:
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256, 8])
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.1
    max_history: int = 20
    # Each history item also gets its own embedding, added to the sum of its code embeddings: the
    # encoder then knows exact item identity, as SASRec does, while the decoder still generates codes.
    # The graphs take `history_items` (B, H) int64 then, padded with item_count.
    history_item_ids: bool = False
    item_count: int = 0  # catalog size, set by the pipeline from the semantic IDs
    # The decoder's first input is BOS plus the encoder's state at the newest history item (the
    # user's summary, as SASRec scores with it), not BOS alone: the first code's head, started from
    # the code centres (train.init_codes_from_features), then begins as a dot product with it.
    decoder_start_from_history: bool = False
    # The encoder's newest state also scores every item by a dot product with the item's token (the
    # encoder's input for it), trained with full-softmax cross-entropy beside the code loss, as SASRec
    # is. The beam search still proposes the candidates (beam_size items through the trie); their
    # final score is the codes' log-probability + item_head_weight * the item head's log-probability
    # (LIGER-style: generative retrieval, dense ranking of what it retrieved).
    item_head: bool = False
    item_head_weight: float = 1.0
    # Also rank the item head's best `item_head_candidates` catalog items the beam did not find,
    # each scored by its codes' log-probability (teacher-forced, renormalized over the trie as the
    # beam scores) + the head's: the beam alone drops items whose first code the decoder misjudges.
    # An inference setting; changing it needs no retraining, only a re-export.
    item_head_candidates: int = 0
    # LETTER's ranking-guided generation loss: the code cross-entropy over logits / tau (tau < 1
    # sharpens the softmax, weighting hard negatives more). decode_with_temperature makes the beam
    # search score with logits / tau as well.
    code_loss_temperature: float = 1.0
    decode_with_temperature: bool = False

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def max_codebook(self) -> int:
        return max(self.codebook_sizes)

    @property
    def history_inputs(self) -> list[str]:
        """The graph inputs that carry the history, in the graphs' order."""
        return ["history_codes", "history_mask"] + (["history_items"] if self.history_item_ids else [])

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(source).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, Tq, D); k, v (B, h, Tk, hd); bias broadcastable to (B, h, Tq, Tk), NEG where masked."""
        q = self.split_heads(self.q(x))
        # T5 leaves out the 1/sqrt(d) scaling and relies on init; we keep it for stability at small sizes.
        scores = q @ k.transpose(-1, -2) * (self.head_dim**-0.5) + bias
        weights = dropout(scores.softmax(-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.out(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.ff = RMSNorm(cfg.d_model), FeedForward(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        k, v = self.attn.keys_values(h)
        x = x + self.dropout(self.attn.attend(h, k, v, bias))
        return x + self.dropout(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.norm1, self.self_attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.cross_attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm3, self.ff = RMSNorm(cfg.d_model), FeedForward(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,  # (S, P, D): S decoder sequences of P code positions
        self_bias: torch.Tensor,  # (1, 1, P, P) causal
        cross_q_groups: int,  # decoder sequences that share one memory row (beams of a request)
        cross_kv: tuple[torch.Tensor, torch.Tensor],  # (S / groups, h, H, hd) each
        cross_bias: torch.Tensor,  # broadcastable to (S / groups, h, groups * P, H)
    ) -> torch.Tensor:
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        x = x + self.dropout(self.self_attn.attend(h, k, v, self_bias))
        s, p, d = x.shape
        # Beams of one request attend to the same memory: fold them into the query axis so the
        # memory keys and values are computed once per request and never copied per beam.
        h = self.norm2(x).reshape(s // cross_q_groups, cross_q_groups * p, d)
        attended = self.cross_attn.attend(h, cross_kv[0], cross_kv[1], cross_bias)
        x = x + self.dropout(attended.reshape(s, p, d))
        return x + self.dropout(self.ff(self.norm3(x)))


class GenerativeRecommender(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.code_embeddings = nn.ModuleList(nn.Embedding(v, d) for v in cfg.codebook_sizes)
        if cfg.history_item_ids and cfg.item_count < 1:
            raise ValueError("history_item_ids needs item_count, the catalog size")
        if cfg.item_head and cfg.item_count < 1:
            raise ValueError("item_head needs item_count, the catalog size")
        # The item head builds each item's token from its codes: set by set_item_codes, saved with the
        # weights. Models without the head have no such buffer, so their older weight files still load.
        if cfg.item_head:
            self.register_buffer("item_codes", torch.zeros(cfg.item_count, cfg.levels, dtype=torch.long))
        else:
            self.item_codes: torch.Tensor | None = None
        # One row per item and a last one for padding.
        self.item_embeddings = nn.Embedding(cfg.item_count + 1, d) if cfg.history_item_ids else None
        self.relative_bias = nn.Embedding(cfg.max_history, cfg.n_heads)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_norm = RMSNorm(d)
        self.bos = nn.Parameter(torch.zeros(d))
        self.decoder_positions = nn.Embedding(cfg.levels, d)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_norm = RMSNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, v, bias=False) for v in cfg.codebook_sizes)
        self.dropout = Dropout(cfg.dropout)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # ---- encoder -------------------------------------------------------------------------
    def embed_items(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., L) -> (..., D): an item token is the sum of its code embeddings."""
        return sum(emb(codes[..., lvl]) for lvl, emb in enumerate(self.code_embeddings))

    def set_item_codes(self, semantic_ids) -> None:
        """semantic_ids (N, L): the catalog's codes, which the item head's item tokens are built from."""
        if self.item_codes is None:
            raise ValueError("this model has no item head (model.item_head)")
        codes = torch.as_tensor(semantic_ids, dtype=torch.long, device=self.item_codes.device)
        if codes.shape != self.item_codes.shape:
            raise ValueError(f"semantic IDs {tuple(codes.shape)} do not match this model's catalog {tuple(self.item_codes.shape)}")
        self.item_codes.copy_(codes)

    def item_tokens(self) -> torch.Tensor:
        """(N, D): every item's encoder input token (codes' sum, plus its own row with history_item_ids)."""
        tokens = self.embed_items(self.item_codes)
        if self.item_embeddings is not None:
            tokens = tokens + self.item_embeddings.weight[: self.cfg.item_count]
        return tokens

    def item_logits(self, user_state: torch.Tensor) -> torch.Tensor:
        """user_state (S, D) encoder outputs -> (S, N) float32 scores of every item as the next one."""
        return (user_state @ self.item_tokens().T).float()

    def item_log_probs(self, user_state: torch.Tensor) -> torch.Tensor:
        """user_state (S, D) -> (S, N) the item head's log-probabilities over the catalog."""
        return self.item_logits(user_state).log_softmax(-1)

    def encoder_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, T) -> (B, h, T, T): causal, within max_history items, relative bias, no pads."""
        t = mask.shape[1]
        pos = torch.arange(t, device=mask.device)
        distance = pos[:, None] - pos[None, :]  # query - key
        allowed = (distance >= 0) & (distance < self.cfg.max_history)
        bias = self.relative_bias(distance.clamp(0, self.cfg.max_history - 1)).permute(2, 0, 1)  # (h, T, T)
        bias = bias.masked_fill(~allowed, NEG)[None]
        # A padded query row would be all-masked under left padding; letting every row see itself keeps softmax finite.
        key_ok = mask[:, None, None, :] | (distance == 0)[None, None]
        return bias.masked_fill(~key_ok, NEG)

    def embed_history(self, history_codes: torch.Tensor, history_items: torch.Tensor | None) -> torch.Tensor:
        """(B, T, L) codes and (B, T) item indices -> (B, T, D) encoder input tokens."""
        x = self.embed_items(history_codes)
        if self.item_embeddings is None:
            return x
        if history_items is None:
            raise ValueError("this model embeds history item ids: pass history_items")
        return x + self.item_embeddings(history_items)

    def encode(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, history_items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """history_codes (B, T, L), history_mask (B, T), history_items (B, T) -> memory (B, T, D)."""
        x = self.dropout(self.embed_history(history_codes, history_items))
        bias = self.encoder_bias(history_mask)
        for layer in self.encoder_layers:
            x = layer(x, bias)
        return self.encoder_norm(x)

    def cross_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross_attn.keys_values(memory) for layer in self.decoder_layers]

    # ---- decoder -------------------------------------------------------------------------
    def decoder_start(self, newest_memory: torch.Tensor) -> torch.Tensor:
        """newest_memory (S, D): the encoder output at each sequence's newest history item -> the
        decoder's first input (S, D) before its position embedding."""
        start = self.bos.expand(newest_memory.shape[0], -1)
        return start + newest_memory if self.cfg.decoder_start_from_history else start

    def decoder_inputs(self, prefix_codes: torch.Tensor, newest_memory: torch.Tensor) -> torch.Tensor:
        """prefix_codes (S, P-1) codes 0..P-2, newest_memory (S, D) -> (S, P, D): [start, code_0, ...] + position."""
        s, p_minus_1 = prefix_codes.shape
        tokens = [self.decoder_start(newest_memory)[:, None]]
        tokens += [self.code_embeddings[lvl](prefix_codes[:, lvl : lvl + 1]) for lvl in range(p_minus_1)]
        x = torch.cat(tokens, dim=1)
        return x + self.decoder_positions.weight[: p_minus_1 + 1]

    def decode(
        self,
        prefix_codes: torch.Tensor,  # (S, P-1)
        newest_memory: torch.Tensor,  # (S, D) encoder output at the newest history item
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cross_bias: torch.Tensor,
        groups: int,
    ) -> torch.Tensor:
        """-> hidden (S, P, D) after the final norm."""
        return self.run_decoder(self.decoder_inputs(prefix_codes, newest_memory), cross_kv, cross_bias, groups)

    def run_decoder(self, x: torch.Tensor, cross_kv, cross_bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """x (S, P, D) decoder inputs, causal over P -> hidden (S, P, D) after the final norm."""
        x = self.dropout(x)
        p = x.shape[1]
        causal = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
        self_bias = torch.zeros(p, p, device=x.device).masked_fill(~causal, NEG)[None, None]
        for layer, kv in zip(self.decoder_layers, cross_kv):
            x = layer(x, self_bias, groups, kv, cross_bias)
        return self.decoder_norm(x)

    def step_input(self, step: int, codes: torch.Tensor, newest_memory: torch.Tensor) -> torch.Tensor:
        """The decoder input at position `step`, as decoder_inputs builds it:
        the start token at 0 (newest_memory (B, D), one beam per request there), else the embedding
        of the previous level's code (codes (S,)); plus the position. -> (S, D)"""
        token = self.decoder_start(newest_memory) if step == 0 else self.code_embeddings[step - 1](codes)
        return self.dropout(token + self.decoder_positions.weight[step])

    def decode_newest(
        self, x: torch.Tensor, self_kv: list[KV], cross_kv: list[KV], cross_bias: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, list[KV]]:
        """decode for the newest position only, with a key/value cache: the one-step decode that the
        beam search (training/beam.py) runs in evaluation, export and serving (eval mode).

        x (S, D): the newest position's input, S = B * groups sequences, the `groups` beams of a
        request next to each other. self_kv: per layer the earlier positions' self-attention keys
        and values (S, h, t, hd). cross_kv: per layer the memory's keys (B, h, hd, H), transposed,
        and values (B, h, H, hd). cross_bias (B, 1, 1, H).
        Returns (hidden (S, D) after the final norm, self_kv with this position appended).

        Mirrors DecoderLayer.forward and Attention.attend with every reshape written for one
        position and constant head sizes, so the exported graph has few shape operations; tests
        hold it equal to model.decode."""
        new_kv: list[KV] = []
        for i, (layer, (cross_keys, cross_values)) in enumerate(zip(self.decoder_layers, cross_kv)):
            attn, cross = layer.self_attn, layer.cross_attn
            heads, head_dim = attn.n_heads, attn.head_dim
            d = heads * head_dim
            # q (scaled by 1/sqrt(hd) here, a constant the export folds), then Attention.keys_values'
            # keys and values (kv's first D outputs, then the next D): one matmul for all three.
            scale = head_dim**-0.5
            qkv = nn.functional.linear(layer.norm1(x), torch.cat([attn.q.weight * scale, attn.kv.weight]))  # (S, 3D)
            q = qkv[:, :d].reshape(-1, heads, 1, head_dim)  # (S, h, 1, hd)
            key = qkv[:, d : 2 * d].reshape(-1, heads, 1, head_dim)  # (S, h, 1, hd)
            value = qkv[:, 2 * d :].reshape(-1, heads, 1, head_dim)  # (S, h, 1, hd)
            if self_kv:
                key, value = torch.cat([self_kv[i][0], key], dim=-2), torch.cat([self_kv[i][1], value], dim=-2)
            new_kv.append((key, value))
            # One query over at most L positions: products and sums over rows of hd, not S * h matmuls
            # of one row (onnxruntime runs a batched MatMul as one small GEMM per head and sequence).
            weights = (q * key).sum(-1).softmax(-1)  # (S, h, t): earlier positions only, no mask
            attended = (weights[..., None] * value).sum(-2)  # (S, h, hd)
            x = x + layer.dropout(attn.out(attended.reshape(-1, d)))
            # Beams of one request share the memory: fold them into the query axis.
            q = nn.functional.linear(layer.norm2(x), cross.q.weight * scale)
            q = q.reshape(-1, groups, heads, head_dim).transpose(1, 2)  # (B, h, groups, hd)
            weights = ((q @ cross_keys) + cross_bias).softmax(-1)  # (B, h, groups, H)
            attended = (weights @ cross_values).transpose(1, 2).reshape(-1, d)  # (S, D)
            x = x + layer.dropout(cross.out(attended))
            x = x + layer.dropout(layer.ff(layer.norm3(x)))
        return self.decoder_norm(x), new_kv

    def level_log_probs(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """hidden (..., D) -> (..., V_max) log-probabilities of code `level`, NEG beyond its codebook."""
        logits = self.heads[level](hidden).float()
        if self.cfg.decode_with_temperature and self.cfg.code_loss_temperature != 1.0:
            logits = logits / self.cfg.code_loss_temperature
        logits = logits.log_softmax(-1)
        pad = self.cfg.max_codebook - logits.shape[-1]
        return F.pad(logits, (0, pad), value=NEG) if pad else logits

    # ---- training: every next item of every sequence in one pass ---------------------------
    def forward(
        self, item_codes: torch.Tensor, mask: torch.Tensor, items: torch.Tensor | None = None, with_states: bool = False
    ):
        """item_codes (B, T, L) of whole training sequences (right-padded), mask (B, T), items (B, T)
        their item indices (needed when the model embeds history item ids or has an item head).

        Position t < T-1 is a history end; the target is item t+1, its history the up-to-
        max_history items ending at t. Returns (mean cross-entropy summed over levels, targets), and
        with_states also the intermediate tensors extra losses read (training/loop.py ExtraLoss):
        user_state (M, D) the encoder's state at each history end, decoder_hidden (M, L, D),
        target_codes (M, L), target_items (M,) (when items are given), history_memory (M, W, D)
        the encoder outputs the decoder attends to and history_valid (M, W) which of them exist."""
        inputs, input_mask = item_codes[:, :-1], mask[:, :-1]
        targets, target_mask = item_codes[:, 1:], mask[:, 1:]
        memory = self.encode(inputs, input_mask, None if items is None else items[:, :-1])  # (B, T-1, D)
        b, t, _ = memory.shape
        window = min(self.cfg.max_history, t)
        batch_idx, pos_idx = target_mask.nonzero(as_tuple=True)  # (M,) targets that exist
        # Each target's memory window: the `window` positions ending at its history end.
        offsets = torch.arange(window - 1, -1, -1, device=memory.device)  # oldest .. newest
        key_pos = pos_idx[:, None] - offsets[None, :]  # (M, W)
        key_ok = key_pos >= 0
        key_pos = key_pos.clamp(min=0)
        cross_kv = []
        for k, v in self.cross_keys_values(memory):  # (B, h, T-1, hd)
            k = k[batch_idx[:, None], :, key_pos].transpose(1, 2)  # (M, h, W, hd)
            v = v[batch_idx[:, None], :, key_pos].transpose(1, 2)
            cross_kv.append((k, v))
        cross_bias = torch.zeros(key_ok.shape, device=memory.device).masked_fill(~key_ok, NEG)[:, None, None, :]
        target_codes = targets[batch_idx, pos_idx]  # (M, L)
        user_state = memory[batch_idx, pos_idx]  # (M, D)
        hidden = self.decode(target_codes[:, :-1], user_state, cross_kv, cross_bias, groups=1)  # (M, L, D)
        loss = self.codes_loss(hidden, target_codes)
        target_items = None if items is None else items[:, 1:][batch_idx, pos_idx]
        if self.cfg.item_head:
            if target_items is None:
                raise ValueError("this model has an item head: pass the sequences' item indices")
            loss = loss + F.cross_entropy(self.item_logits(user_state), target_items)
        n_targets = int(batch_idx.numel())
        if not with_states:
            return loss, n_targets
        states = {"user_state": user_state, "decoder_hidden": hidden, "target_codes": target_codes,
                  "history_memory": memory[batch_idx[:, None], key_pos], "history_valid": key_ok}
        if target_items is not None:
            states["target_items"] = target_items
        return loss, n_targets, states

    def codes_loss(self, hidden: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """hidden (M, L, D) decoder states, target_codes (M, L) -> mean cross-entropy summed over
        levels, of logits / code_loss_temperature."""
        loss = hidden.new_zeros((), dtype=torch.float32)
        for lvl in range(self.cfg.levels):
            logits = self.heads[lvl](hidden[:, lvl]).float()
            if self.cfg.code_loss_temperature != 1.0:
                logits = logits / self.cfg.code_loss_temperature
            loss = loss + F.cross_entropy(logits, target_codes[:, lvl])
        return loss
