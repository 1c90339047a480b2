from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import make_synthetic_dataset
from training.embeddings import embeddings_cache_path, get_text_encoder
from training.item_features import item_views
from training.sasrec import default_artifact_path, load_item_embeddings, save_item_embeddings
from training.tokenizers import VIEWS


def item_features(view: str, text, dataset, **kwargs) -> np.ndarray:
    """The matrix a tokenizer reading `view` fits."""
    return item_views(set(view.split("+")), text, dataset, **kwargs).matrix(view)


def no_text() -> np.ndarray:
    raise AssertionError("collaborative features must not compute text embeddings")


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_text_features_are_the_text_embeddings(cache_dir: Path) -> None:
    dataset = make_synthetic_dataset(n_users=50, n_items=20)
    text = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    np.testing.assert_array_equal(item_features("text", lambda: text, dataset, seed=0), text)
    assert not cache_dir.exists()  # no SASRec artifact was needed


def test_concatenation_uses_the_cached_artifact_with_unit_halves(cache_dir: Path) -> None:
    dataset = make_synthetic_dataset(n_users=50, n_items=20)
    rng = np.random.default_rng(0)
    text = rng.normal(size=(20, 8)).astype(np.float32) * 3
    collaborative = rng.normal(size=(20, 4)).astype(np.float32)
    save_item_embeddings(default_artifact_path(dataset.name, 0), collaborative,
                         {"dataset": dataset.name, "interactions": dataset.interactions_fingerprint()})

    both = item_features("text+collaborative", lambda: text, dataset, seed=0, collaborative_weight=0.5)
    assert both.shape == (20, 12)
    np.testing.assert_allclose(np.linalg.norm(both[:, :8], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both[:, 8:], axis=1), 0.5, rtol=1e-5)
    # same directions as the artifact's rows
    cosine = (both[:, 8:] * collaborative).sum(1) / (0.5 * np.linalg.norm(collaborative, axis=1))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


def test_a_mismatched_artifact_is_retrained_on_this_catalog(cache_dir: Path) -> None:
    dataset = make_synthetic_dataset(n_users=120, n_items=24, seed=3)
    path = default_artifact_path(dataset.name, 0)
    save_item_embeddings(path, np.ones((5, 4), dtype=np.float32), {"dataset": dataset.name})  # another catalog's size

    features = item_features("collaborative", no_text, dataset, seed=0, progress=False)
    assert features.shape[0] == 24
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    retrained, meta = load_item_embeddings(path)
    assert retrained.shape[0] == 24 and meta["dataset"] == dataset.name


def test_a_table_from_other_interactions_of_the_same_catalog_is_retrained(cache_dir: Path) -> None:
    """Same folder name, same items, updated sequences: the cached table was trained on interactions
    this dataset no longer has, so it is not reused (nor are its SASRec figures)."""
    import dataclasses

    from training.item_features import sasrec_reference

    dataset = make_synthetic_dataset(n_users=120, n_items=24, seed=3)
    item_features("collaborative", no_text, dataset, seed=0, progress=False)
    path = default_artifact_path(dataset.name, 0)
    first, meta = load_item_embeddings(path)
    assert meta["interactions"] == dataset.interactions_fingerprint() and sasrec_reference(dataset, 0) is not None

    updated = dataclasses.replace(dataset, sequences=[s[::-1].copy() for s in dataset.sequences])
    assert updated.name == dataset.name and updated.interactions_fingerprint() != dataset.interactions_fingerprint()
    assert sasrec_reference(updated, 0) is None  # the cached figures are another split's
    item_features("collaborative", no_text, updated, seed=0, progress=False)
    retrained, meta = load_item_embeddings(path)
    assert meta["interactions"] == updated.interactions_fingerprint()
    assert not np.array_equal(retrained, first)


def test_unknown_kind_names_the_known_ones(cache_dir: Path) -> None:
    dataset = make_synthetic_dataset(n_users=50, n_items=20)
    with pytest.raises(ValueError, match="text\\+collaborative"):
        item_features("graph", no_text, dataset, seed=0)


def test_every_named_configuration_clusters_known_features() -> None:
    from training.configs import BEST_CONFIG, CONFIGS, get_config

    for name in CONFIGS:
        assert get_config(name, "a-dataset").item_features in VIEWS, name
    assert set(BEST_CONFIG.values()) <= set(CONFIGS)


def test_shared_inputs_are_prepared_once_for_side_by_side_seeds(cache_dir: Path, tmp_path: Path) -> None:
    import dataclasses

    from training.configs import get_config
    from training.data import load_dataset, write_dataset
    from training.pipeline import prepare_shared_inputs

    folder = write_dataset(make_synthetic_dataset(n_users=120, n_items=24, seed=4), tmp_path / "shop")
    cfg = dataclasses.replace(get_config("tiny", str(folder)), item_features="collaborative", collaborative_seed=3)
    prepare_shared_inputs(cfg, progress=False)
    embeddings, meta = load_item_embeddings(default_artifact_path(load_dataset(str(folder)).name, 3))
    assert embeddings.shape[0] == 24 and meta["seed"] == 3
    # Collaborative codes need no text embeddings, but the export's new-item path does: each seed
    # would otherwise embed the catalog's texts itself.
    texts = load_dataset(str(folder)).texts
    assert embeddings_cache_path(texts, get_text_encoder(cfg.text_encoder)).is_file()
