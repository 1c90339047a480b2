"""Configurations derived from the data's statistics (training/auto_config.py) and `genrec tune`."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from training.auto_config import DataShape, derived_config, tune, tune_table
from training.configs import apply_overrides
from training.data import make_synthetic_dataset, write_dataset


def test_the_derived_configuration_follows_the_data_not_its_name() -> None:
    long_small = make_synthetic_dataset(400, 60, seed=0, n_clusters=2, max_length=30)  # long histories, small catalog
    short_large = make_synthetic_dataset(20000, 6000, seed=0)  # short sessions, a large catalog
    long_cfg = derived_config("a", DataShape.of(long_small))
    short_cfg = derived_config("b", DataShape.of(short_large))
    assert DataShape.of(long_small).history_p90 > 20
    assert long_cfg.model.max_history > 20 == short_cfg.model.max_history  # the window covers most histories
    assert long_cfg.train.max_sequence_items > long_cfg.model.max_history
    assert long_cfg.sasrec["max_len"] == long_cfg.model.max_history
    assert long_cfg.train.batch_size < short_cfg.train.batch_size  # ~200 steps an epoch either way
    assert long_cfg.model.d_model < short_cfg.model.d_model
    assert long_cfg.tokenizer_params["codebook_size"] < short_cfg.tokenizer_params["codebook_size"]
    # Over a long window the decoder starts from the newest state; a short one keeps BOS alone.
    assert long_cfg.model.decoder_start_from_history and not short_cfg.model.decoder_start_from_history
    # Every position is a target: the same users with longer histories give more targets a step, a larger step.
    shorter = derived_config("c", DataShape.of(make_synthetic_dataset(400, 60, seed=0, n_clusters=2, max_length=8)))
    assert shorter.train.batch_size == long_cfg.train.batch_size
    assert 5e-4 <= shorter.train.lr < long_cfg.train.lr <= 2e-3
    renamed = dataclasses.replace(long_small, name="beauty")
    assert dataclasses.replace(derived_config("a", DataShape.of(renamed)), name="x") == dataclasses.replace(long_cfg, name="x")


def test_a_dataset_folder_without_a_config_gets_the_derived_one(tmp_path: Path) -> None:
    from training.cli import _config

    folder = write_dataset(make_synthetic_dataset(300, 60, seed=0, n_clusters=2, max_length=40), tmp_path / "shop")
    cfg = _config(argparse.Namespace(config=None, dataset=str(folder), set=["train.lr=0.0005"]))
    assert cfg.name == "derived-shop" and cfg.dataset == str(folder)
    assert cfg.model.max_history > 20 and cfg.train.lr == 0.0005
    bundled = _config(argparse.Namespace(config=None, dataset="scientific", set=[]))
    assert bundled.name == "scientific-cf-item-head" and bundled.model.max_history == 20  # the protocol's window


def test_tune_runs_every_candidate_and_chooses_on_validation(tmp_path: Path) -> None:
    folder = write_dataset(make_synthetic_dataset(300, 60, seed=0, n_clusters=3, max_length=25), tmp_path / "shop")
    base = apply_overrides(derived_config(str(folder), DataShape.of(make_synthetic_dataset(300, 60, seed=0, n_clusters=3,
                                                                                             max_length=25))),
                           ["train.epochs=1", "model.encoder_layers=1", "model.decoder_layers=1", "check_users=4",
                            "final_eval_users=120", 'sasrec={"epochs": 2}'])
    result = tune(base, budget_minutes=2, models_dir=tmp_path / "models", progress=False)
    assert set(result["rows"]) == {"derived", "wider", "half-lr"}
    best = max(row["valid"]["ndcg@10"] for row in result["rows"].values())
    assert result["rows"][result["chosen"]]["valid"]["ndcg@10"] == best
    assert Path(result["bundle"]).is_dir()
    assert result["rows"]["wider"]["config"]["model"]["d_model"] == 2 * base.model.d_model
    assert "(chosen)" in tune_table(result)


def test_unknown_sasrec_settings_are_refused() -> None:
    from training.item_features import sasrec_configs

    with pytest.raises(ValueError, match="unknown SASRec setting"):
        sasrec_configs(make_synthetic_dataset(50, 20), 0, {"layers": 3})
