""""The usual way" to serve a TIGER-style recommender, as public TIGER / LETTER code does it:
transformers' T5ForConditionalGeneration, `generate(num_beams=..., prefix_allowed_tokens_fn=...)`
over a Python dict trie, one request at a time. Random weights: this measures time, not quality.

Tokens: 0 pad (also the decoder start), 1 eos, 2 unk, then each level's codes in their own range
(level l, code c -> 3 + sum(codebook_sizes[:l]) + c); the encoder reads history items x L codes.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

SPECIAL_TOKENS = 3
EOS = 1


class UsualT5Recommender:
    def __init__(self, semantic_ids: np.ndarray, codebook_sizes: Sequence[int], *, d_model: int, d_ff: int,
                 n_heads: int, encoder_layers: int, decoder_layers: int, beam_size: int, k: int,
                 threads: int = 2, seed: int = 0, device: str = "cpu") -> None:
        import torch
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        self.torch = torch
        self.levels = len(codebook_sizes)
        self.offsets = SPECIAL_TOKENS + np.concatenate([[0], np.cumsum(codebook_sizes)[:-1]]).astype(np.int64)
        config = T5Config(
            vocab_size=SPECIAL_TOKENS + int(sum(codebook_sizes)), d_model=d_model, d_kv=d_model // n_heads, d_ff=d_ff,
            num_heads=n_heads, num_layers=encoder_layers, num_decoder_layers=decoder_layers,
            pad_token_id=0, eos_token_id=EOS, decoder_start_token_id=0, dropout_rate=0.0,
        )
        self.device = device
        self.model = T5ForConditionalGeneration(config).eval().to(device)
        self.beam_size, self.k = beam_size, k
        self.tokens = semantic_ids.astype(np.int64) + self.offsets  # (N, L) item -> its L tokens
        # The dict trie: decoder prefix (tokens after the start token) -> allowed next tokens.
        self.allowed: dict[tuple[int, ...], list[int]] = {}
        children: dict[tuple[int, ...], set[int]] = {}
        for row in self.tokens.tolist():
            for depth in range(self.levels):
                children.setdefault(tuple(row[:depth]), set()).add(row[depth])
        self.allowed = {prefix: sorted(tokens) for prefix, tokens in children.items()}
        self.item_of = {tuple(row): i for i, row in enumerate(self.tokens.tolist())}

    def _prefix_allowed_tokens(self, batch_id: int, sent) -> list[int]:
        prefix = tuple(sent.tolist()[1:])  # drop the decoder start token
        return self.allowed.get(prefix, [EOS])

    def recommend(self, history: np.ndarray) -> list[int]:
        """One request: history item indices (oldest first) -> up to k item indices."""
        torch = self.torch
        input_ids = torch.as_tensor(self.tokens[history].reshape(1, -1), device=self.device)  # (1, H * L)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                num_beams=self.beam_size, num_return_sequences=self.k, do_sample=False,
                max_new_tokens=self.levels, min_new_tokens=self.levels, early_stopping=True,
                prefix_allowed_tokens_fn=self._prefix_allowed_tokens,
            )
        return [self.item_of.get(tuple(row[1 : 1 + self.levels]), -1) for row in out.tolist()]


def time_usual_way(recommender: UsualT5Recommender, histories: Sequence[np.ndarray]) -> dict:
    recommender.recommend(histories[0])  # warm-up
    latencies = []
    valid = 0
    start = time.perf_counter()
    for history in histories:
        t0 = time.perf_counter()
        items = recommender.recommend(history)
        latencies.append(time.perf_counter() - t0)
        valid += sum(i >= 0 for i in items)
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    return {
        "requests": len(histories), "rps": len(histories) / wall, "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
        "valid_items_per_request": valid / len(histories),
    }
