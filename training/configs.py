"""Pipeline configurations: `PipelineConfig`, and the named ones `genrec pipeline --config` runs.

Each name says what the configuration is: dataset, tokenizer and item view, and what the
recommender adds. BEST_CONFIG is what `make bench-quality DATASET=<name>` runs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from training.joint import JointConfig
from training.model import Seq2SeqConfig
from training.store import StoreTaskConfig
from training.store_model import StoreConfig
from training.train import TrainConfig


@dataclass
class PipelineConfig:
    name: str  # also the bundle name
    dataset: str  # "beauty", "scientific" or a folder in the genrec format
    text_encoder: str = "all-MiniLM-L6-v2"
    tokenizer: str = "rqvae"
    item_features: str = "text"  # the item view the tokenizer reads (training/tokenizers/base.py VIEWS)
    collaborative_weight: float = 1.0  # the collaborative half's scale in "text+collaborative"
    # The SASRec artifact's seed: an upstream input fixed across the recommender's seeds, as the text encoder is.
    collaborative_seed: int = 0
    tokenizer_params: dict[str, Any] = field(default_factory=dict)
    # The collision level's codebook size; None: the largest group of items sharing their codes.
    # Set it when codes change during training (a tokenizer trained beside the recommender).
    collision_capacity: int | None = None
    model_kind: str = "seq2seq"  # training/model_kinds.py
    # SASRec on the same split (trained when not cached): its figures beside the model's, and its
    # item table for the code quality figure (how alike items sharing a first code are).
    collaborative_reference: bool = True
    # SASRec settings beside the bundled datasets' recipes (training/item_features.py sasrec_configs).
    sasrec: dict[str, Any] = field(default_factory=dict)
    model: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    joint: JointConfig | None = None  # train the tokenizer beside the recommender (training/joint.py)
    store: StoreTaskConfig | None = None  # STORE's task mix and code source (model_kind "store", training/store.py)
    evaluate_unconstrained: bool = False  # also rank test users by a search without the trie (invalid IDs miss)
    beam_size: int = 20
    # With an item head: also try beam_size item-head candidates (model.item_head_candidates) on the
    # validation users after training, and keep them, in the figures and the bundle, only if NDCG@10 rises.
    choose_item_head_candidates: bool = False
    # Fuse the served ranking with the last item's most frequent successors (service/fusion.py), the
    # weight chosen on the validation users among TRANSITION_FUSION_WEIGHTS (none if no weight raises
    # NDCG@10); the leave-one-out split only. The figures and the bundle are then the fused ranking's.
    choose_transition_fusion: bool = False
    # "leave-one-out" (the protocol), or "new-items" (training/splits.py): new_item_fraction of the
    # items, stratified by popularity and chosen with new_item_seed (fixed across seeds, as the
    # split is), held out of training and tokenizer fitting; figures by target group.
    split: str = "leave-one-out"
    new_item_fraction: float = 0.05
    new_item_seed: int = 0
    check_users: int = 64  # users whose served top-10 is compared with torch at export
    final_eval_users: int | None = None  # None: every user (the protocol); a number: a seeded sample (demo only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _named(name: str, dataset: str, **fields: Any) -> tuple[str, PipelineConfig]:
    return name, PipelineConfig(name=name, dataset=dataset, **fields)


# The recommender these share: 4 + 4 layers, d 128 (Seq2SeqConfig's defaults).
# Collaborative codes: RQ-KMeans over SASRec's item table (trained first on the same split when not cached).
_ITEM_HEAD_MODEL = Seq2SeqConfig(history_item_ids=True, item_head=True)  # + one embedding per history item, + item head
_LETTER_TOKENIZER = {"cf_weight": 0.1, "diversity_weight": 1e-4}  # the paper's Beauty values
_LETTER_TAU = 0.7  # the 3-seed Scientific rows (docs/results.md); lower tau ranked better on validation there
CONFIGS: dict[str, PipelineConfig] = dict([
    # Seconds on 2 cores, on a dataset folder given at run time (a synthetic one in tests and examples).
    _named("tiny", "", text_encoder="hashing-64", tokenizer="rqkmeans",
           tokenizer_params={"levels": 2, "codebook_size": 8, "iters": 10},
           model=Seq2SeqConfig(d_model=32, n_heads=2, d_ff=64, encoder_layers=1, decoder_layers=1, dropout=0.0),
           train=TrainConfig(epochs=3, batch_size=64, lr=3e-3, warmup_steps=5, eval_users=200, patience=3),
           check_users=16),
    # What `make run` builds when models/ is empty: real Beauty items, a few minutes of training.
    _named("beauty-demo", "beauty", tokenizer="rqkmeans", tokenizer_params={"levels": 3, "codebook_size": 256, "iters": 15},
           model=Seq2SeqConfig(d_model=64, n_heads=2, d_ff=256, encoder_layers=2, decoder_layers=2),
           train=TrainConfig(epochs=2, eval_users=1000, min_epochs=0), check_users=32, final_eval_users=2000),
    # TIGER's recipe: RQ-VAE 3 x 256 on text embeddings (+ collision level). 90 minutes of training
    # keeps a run within 2 hours on 2 cores.
    _named("beauty-tiger", "beauty", tokenizer="rqvae", train=TrainConfig(max_train_seconds=5400)),
    _named("scientific-tiger", "scientific", tokenizer="rqvae", train=TrainConfig(max_train_seconds=5400)),
    # Residual k-means codes of the text embeddings.
    _named("beauty-rqkmeans-text", "beauty", tokenizer="rqkmeans", train=TrainConfig(max_train_seconds=4200, eval_users=2000)),
    _named("scientific-rqkmeans-text", "scientific", tokenizer="rqkmeans",
           train=TrainConfig(max_train_seconds=1500, eval_users=2000)),
    # Collaborative codes: items bought by the same people share a code prefix.
    _named("beauty-rqkmeans-cf", "beauty", tokenizer="rqkmeans", item_features="collaborative",
           train=TrainConfig(max_train_seconds=3600, eval_users=2000, eval_every=2)),
    _named("scientific-rqkmeans-cf", "scientific", tokenizer="rqkmeans", item_features="collaborative",
           train=TrainConfig(max_train_seconds=1500, eval_users=2000)),
    # Codes of [text ; SASRec] embeddings, each L2-normalised: both kinds of neighbours.
    _named("beauty-rqkmeans-text-cf", "beauty", tokenizer="rqkmeans", item_features="text+collaborative",
           train=TrainConfig(max_train_seconds=4200, eval_users=2000)),
    # The recommender on the LETTER codes published with the dataset (data/beauty/semantic_ids).
    _named("beauty-letter-published-codes", "beauty", tokenizer="precomputed",
           tokenizer_params={"path": "data/beauty/semantic_ids/LETTER_Beauty.index.json"},
           train=TrainConfig(max_train_seconds=5400)),
    # LETTER: the TIGER rows' RQ-VAE (3 x 256, 32-d latent) on text with the collaborative loss
    # (alpha, against SASRec's item table) and the diversity loss (beta), a Sinkhorn-balanced last
    # level, and the ranking-guided code loss (tau, model.code_loss_temperature).
    _named("scientific-letter", "scientific", tokenizer="letter", tokenizer_params=_LETTER_TOKENIZER,
           model=Seq2SeqConfig(code_loss_temperature=_LETTER_TAU), train=TrainConfig(max_train_seconds=1500, eval_users=2000)),
    _named("beauty-letter", "beauty", tokenizer="letter", tokenizer_params=_LETTER_TOKENIZER,
           model=Seq2SeqConfig(code_loss_temperature=_LETTER_TAU), train=TrainConfig(max_train_seconds=5400)),
    # ETEGRec (training/joint.py): an RQ-VAE pre-trained on SASRec's item table, then trained with the
    # recommender, alternating, with the SIA and PSA alignment losses; codes refreshed after each
    # tokenizer epoch within a fixed collision capacity. `--set joint.schedule=frozen` is the control.
    _named("scientific-etegrec", "scientific", tokenizer="rqvae", item_features="collaborative", collision_capacity=16,
           joint=JointConfig(), evaluate_unconstrained=True, train=TrainConfig(max_train_seconds=1500, eval_users=2000)),
    # Beauty's pre-trained RQ-VAE puts up to 33 items on one code tuple: a capacity of 64 leaves room for refreshes.
    _named("beauty-etegrec", "beauty", tokenizer="rqvae", item_features="collaborative", collision_capacity=64,
           joint=JointConfig(), evaluate_unconstrained=True, train=TrainConfig(max_train_seconds=5400)),
    # Genrec's variant: joint training started from the residual k-means codes of SASRec's table (an
    # identity-initialised linear RQ-VAE), so it starts where the frozen collaborative pipeline ends.
    _named("scientific-etegrec-from-rqkmeans", "scientific", tokenizer="rqkmeans", item_features="collaborative",
           collision_capacity=16, joint=JointConfig(), evaluate_unconstrained=True,
           train=TrainConfig(max_train_seconds=1500, eval_users=2000)),
    # The best measured: collaborative codes, the code embeddings and heads started from the SASRec
    # table they were fitted on (train.init_codes_from_features), an embedding per history item
    # started from what the codes leave unexplained, and the item head: the encoder's newest state
    # scores every item (SASRec's objective beside the code loss) and ranks the beam's items with
    # the codes; the served ranking fused with the last item's successors where validation says so.
    # Beauty: 64 sequences per step (more optimizer steps in a CPU budget), checkpoints
    # chosen on 4,000 validation users, 85 minutes of training (SASRec + training + evaluation
    # under 2 hours).
    _named("beauty-cf-item-head", "beauty", tokenizer="rqkmeans", item_features="collaborative", model=_ITEM_HEAD_MODEL,
           train=TrainConfig(max_train_seconds=5100, eval_users=4000, eval_every=2, init_codes_from_features=True,
                             batch_size=64, lr=1e-3), choose_transition_fusion=True),
    # LETTER's codes with the Beauty default's recommender and schedule (item ids, item head, warm start, batch 64):
    # the comparison issue 26 asks for, at the default's epoch count.
    _named("beauty-letter-item-head", "beauty", tokenizer="letter", tokenizer_params=_LETTER_TOKENIZER,
           model=dataclasses.replace(_ITEM_HEAD_MODEL, code_loss_temperature=_LETTER_TAU),
           train=TrainConfig(max_train_seconds=5100, eval_users=4000, eval_every=2, init_codes_from_features=True,
                             batch_size=64, lr=1e-3)),
    _named("scientific-cf-item-head", "scientific", tokenizer="rqkmeans", item_features="collaborative",
           model=_ITEM_HEAD_MODEL,
           train=TrainConfig(max_train_seconds=1200, eval_users=2000, init_codes_from_features=True),
           choose_transition_fusion=True),
    # STORE (training/store.py): one model and vocabulary for K2K, T2K, K2T and H2K, on RQ-KMeans codes of
    # the MiniLM text embeddings (the scientific-rqkmeans-text row's codes, recommender size and budget).
    # Ablations: --set store.t2k_weight=0 (etc.) switches a task off; store.codes=own refreshes the codes
    # from the model's own text states. The collision capacity is fixed so refreshed or new items' codes fit:
    # 32 overflowed on Scientific's new-item split (an under-trained T2K put 48 of 219 held-out items on one tuple).
    _named("tiny-store", "", text_encoder="hashing-64", tokenizer="rqkmeans",
           tokenizer_params={"levels": 2, "codebook_size": 8, "iters": 10}, model_kind="store", collision_capacity=16,
           model=StoreConfig(d_model=32, n_heads=2, d_ff=64, encoder_layers=1, decoder_layers=1, dropout=0.0,
                             max_text_tokens=16, max_encoder_tokens=32),
           store=StoreTaskConfig(text_items=16, h2k_history_items=2, h2k_tokens_per_item=6),
           train=TrainConfig(epochs=3, batch_size=64, lr=3e-3, warmup_steps=5, eval_users=200, patience=3),
           check_users=16),
    _named("scientific-store", "scientific", tokenizer="rqkmeans", model_kind="store", collision_capacity=128,
           model=StoreConfig(), store=StoreTaskConfig(), train=TrainConfig(max_train_seconds=1500, eval_users=2000)),
    _named("scientific-store-own-codes", "scientific", tokenizer="rqkmeans", model_kind="store", collision_capacity=128,
           model=StoreConfig(), store=StoreTaskConfig(codes="own"),
           train=TrainConfig(max_train_seconds=1500, eval_users=2000)),
    _named("beauty-store", "beauty", tokenizer="rqkmeans", model_kind="store", collision_capacity=128,
           model=StoreConfig(), store=StoreTaskConfig(), train=TrainConfig(max_train_seconds=4200, eval_users=2000)),
    _named("beauty-store-own-codes", "beauty", tokenizer="rqkmeans", model_kind="store", collision_capacity=128,
           model=StoreConfig(), store=StoreTaskConfig(codes="own"),
           train=TrainConfig(max_train_seconds=4200, eval_users=2000)),
])


# What `make bench-quality DATASET=<name>` runs without CONFIG: the best measured configuration.
BEST_CONFIG = {"beauty": "beauty-cf-item-head", "scientific": "scientific-cf-item-head"}


DERIVED = "derived"  # not a fixed configuration: derived from the dataset's statistics (training/auto_config.py)


def get_config(name: str, dataset: str | None = None) -> PipelineConfig:
    """A named configuration, on another dataset when `dataset` is given; "derived" sizes one to `dataset`."""
    if name == DERIVED:
        if not dataset:
            raise ValueError("the derived configuration needs a dataset (--dataset beauty, scientific or a folder)")
        from training.auto_config import DataShape, derived_config
        from training.data import load_dataset

        return derived_config(dataset, DataShape.of(load_dataset(dataset)))
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS) + [DERIVED]}")
    cfg = CONFIGS[name]
    if dataset is not None:
        cfg = dataclasses.replace(cfg, dataset=dataset)
    if not cfg.dataset:
        raise ValueError(f"config {name!r} has no dataset of its own: pass one (a dataset folder)")
    return cfg


def apply_overrides(cfg: PipelineConfig, assignments: list[str]) -> PipelineConfig:
    """`train.lr=1e-3`, `model.d_model=256`, `tokenizer_params.balanced=true`: values parse as JSON, else text."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), train=dataclasses.replace(cfg.train),
                              tokenizer_params=dict(cfg.tokenizer_params), sasrec=dict(cfg.sasrec),
                              joint=dataclasses.replace(cfg.joint) if cfg.joint is not None else None,
                              store=dataclasses.replace(cfg.store) if cfg.store is not None else None)
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"override {assignment!r} must look like field=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = path.split(".")
        target: Any = cfg
        for part in parents:
            target = target[part] if isinstance(target, dict) else getattr(target, part)
        if isinstance(target, dict):
            target[leaf] = value
        elif hasattr(target, leaf):
            setattr(target, leaf, value)
        else:
            raise ValueError(f"unknown config field {path!r}")
    return cfg
