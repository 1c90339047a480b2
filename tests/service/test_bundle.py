from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.bundle import Bundle, BundleError, load_bundle, sha256_file
from service.config import Settings, find_newest_bundle


def rewrite_manifest(bundle_dir: Path, **changes: object) -> None:
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_demo_bundle_loads_with_consistent_tables(demo_bundle: Bundle) -> None:
    assert demo_bundle.semantic_ids.ndim == 2 and demo_bundle.semantic_ids.dtype == np.int32
    assert len(demo_bundle.item_ids) == len(demo_bundle.titles) == demo_bundle.num_items
    assert demo_bundle.beam_size == 20 and demo_bundle.max_history == 20
    first = demo_bundle.item_ids[0]
    assert demo_bundle.lookup([first, "no-such-item", first]) == ([0, 0], ["no-such-item"])


def test_a_changed_file_is_refused_with_its_name(bundle_copy: Path) -> None:
    popularity = np.load(bundle_copy / "popularity.npy")
    np.save(bundle_copy / "popularity.npy", popularity[::-1].copy())
    with pytest.raises(BundleError, match=r"popularity\.npy: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_a_changed_graph_is_refused(bundle_copy: Path) -> None:
    with open(bundle_copy / "beam_search.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"beam_search\.onnx: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_unknown_schema_version_is_refused(bundle_copy: Path) -> None:
    rewrite_manifest(bundle_copy, schema_version=99)
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        load_bundle(bundle_copy)


def test_a_missing_listed_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="'decoder.onnx' but the file is missing"):
        load_bundle(bundle_copy)


def test_a_required_file_must_be_checksummed(bundle_copy: Path) -> None:
    files = json.loads((bundle_copy / "manifest.json").read_text())["files"]
    del files["items.jsonl"]
    rewrite_manifest(bundle_copy, files=files)
    with pytest.raises(BundleError, match="does not list required"):
        load_bundle(bundle_copy)


def test_a_pickled_array_is_never_loaded(bundle_copy: Path) -> None:
    np.save(bundle_copy / "popularity.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    files = json.loads((bundle_copy / "manifest.json").read_text())["files"]
    files["popularity.npy"] = sha256_file(bundle_copy / "popularity.npy")
    rewrite_manifest(bundle_copy, files=files)
    with pytest.raises(BundleError, match="without pickle"):
        load_bundle(bundle_copy)


def test_files_outside_the_manifest_are_not_served(demo_bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="does not list 'model.pt'"):
        demo_bundle.file("model.pt")


def test_newest_bundle_is_found_by_created_at(tmp_path: Path) -> None:
    for name, version, created in [("a", "v1", "2026-01-01T00:00:00Z"), ("b", "v0", "2026-03-01T00:00:00Z"),
                                   ("a", "v2", "2026-02-01T00:00:00Z")]:
        (tmp_path / name / version).mkdir(parents=True)
        (tmp_path / name / version / "manifest.json").write_text(json.dumps({"created_at": created}))
    assert find_newest_bundle(tmp_path) == tmp_path / "b" / "v0"
    assert Settings(models_root=tmp_path).resolved_bundle_dir() == tmp_path / "b" / "v0"
    with pytest.raises(FileNotFoundError, match="GENREC_BUNDLE_DIR"):
        find_newest_bundle(tmp_path / "empty")


def test_settings_read_the_genrec_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENREC_PORT", "9001")
    monkeypatch.setenv("GENREC_ENGINE", "reference")
    monkeypatch.setenv("GENREC_REDIS_URL", "redis://localhost:6379/0")
    settings = Settings()
    assert (settings.port, settings.engine, settings.redis_url) == (9001, "reference", "redis://localhost:6379/0")
    monkeypatch.setenv("GENREC_ENGINE", "torch")
    with pytest.raises(ValueError):
        Settings()


def test_every_bundle_file_is_readable_by_other_users(demo_bundle: Bundle) -> None:
    """The non-root serving image reads bundles written by another uid: 0644 files, a 0755 folder."""
    assert demo_bundle.path.stat().st_mode & 0o777 == 0o755
    for path in demo_bundle.path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name


def test_an_unreadable_file_is_refused_with_what_to_do(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.bundle

    def denied(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(service.bundle, "sha256_file", denied)
    with pytest.raises(BundleError, match="cannot be read by this process.*chmod"):
        load_bundle(bundle_copy)
