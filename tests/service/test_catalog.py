"""The catalog API in-process: adding, updating and deleting items, collisions, persistence, replicas."""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import file_digests, load_bundle
from service.catalog import (ACTIVE, Catalog, FileCatalogStore, ItemRecord, RedisCatalogStore, SlotTaken,
                             apply_records, initial_view)
from service.engine import NEW_ITEM_INDICES_KEY, OnnxBeamEngine
from tests.service.conftest import build_catalog_bundle
from tests.service.test_api import make_settings

TOKEN = "catalog-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def recommended(client: TestClient, history: list[str], k: int = 20) -> list[str]:
    """Items the beam found (score not null), best first."""
    body = client.post("/recommend", json={"history": history, "k": k}).json()
    return [item["item_id"] for item in body["items"] if item["score"] is not None]


def all_answers(client: TestClient, history: list[str]) -> list[str]:
    """Every item of a k=100 answer: the beam's and the popularity fill's."""
    return [item["item_id"] for item in client.post("/recommend", json={"history": history, "k": 100}).json()["items"]]


def same_topic(bundle, index: int) -> list[str]:
    """Catalog items sharing item `index`'s code prefix: a history of items like it."""
    prefix = bundle.semantic_ids[index, :-1]
    return [bundle.item_ids[i] for i in np.flatnonzero((bundle.semantic_ids[:, :-1] == prefix).all(1))]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def client(catalog_bundle_dir: Path, state_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(catalog_bundle_dir, admin_token=TOKEN, catalog_state_dir=state_dir)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.slow
def test_an_item_added_by_text_is_recommended_beside_its_kind_and_gone_once_deleted(client, catalog_bundle_dir,
                                                                                    catalog_dataset) -> None:
    bundle = load_bundle(catalog_bundle_dir)
    source = 5
    text = catalog_dataset.texts[catalog_dataset.item_ids.index(bundle.item_ids[source])]
    response = client.put("/items/new-polish", headers=ADMIN,
                          json={"title": "New nail polish", "text": text,
                                "attributes": {"brand": "brand5", "category": ["Makeup", "Nails"]}})
    assert response.status_code == 201, response.text
    added = response.json()
    assert added["created"] is True and added["state"] == "active" and added["source"] == "added"
    assert added["attributes"] == {"brand": ["brand5"], "category": ["Makeup", "Nails"]}
    # Its text's codes are those of the item it was copied from; the collision level tells them apart.
    assert added["codes"][:-1] == bundle.semantic_ids[source, :-1].tolist()
    assert added["codes"] not in bundle.semantic_ids.tolist()
    history = same_topic(bundle, source)[:4]
    assert "new-polish" in recommended(client, history)

    # Histories take the new id, and a request history with it is read (not dropped as unknown).
    assert client.post("/users/u-new/events", json={"item_ids": ["new-polish"]}).status_code == 200
    answer = client.post("/recommend", json={"history": [*history, "new-polish"], "k": 5}).json()
    assert not any("unknown" in w for w in answer["warnings"])

    assert client.delete("/items/new-polish", headers=ADMIN).json()["state"] == "deleted"
    assert "new-polish" not in all_answers(client, history)
    assert client.get("/items/new-polish", headers=ADMIN).json()["state"] == "deleted"
    # A trained item deleted is gone from the beam and from the popularity fill.
    popular = bundle.item_ids[int(bundle.popularity[0])]
    client.delete(f"/items/{popular}", headers=ADMIN)
    assert popular not in all_answers(client, history)
    assert popular not in all_answers(client, ["no-such-item"])  # the popular-only answer
    # Put back, it is recommendable again with the codes it was trained with.
    again = client.put(f"/items/{popular}", headers=ADMIN, json={"title": "Back in stock", "text": "anything"})
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["codes"] == bundle.semantic_ids[int(bundle.popularity[0])].tolist()
    assert popular in all_answers(client, ["no-such-item"])


@pytest.mark.slow
def test_constraints_see_added_items_and_never_deleted_ones(client, catalog_bundle_dir, catalog_dataset) -> None:
    """Per-request filters run over the live catalog: an attribute given at PUT matches the added
    item alone, and a deleted item matches nothing, through the beam and the popularity fill."""
    bundle = load_bundle(catalog_bundle_dir)
    text = catalog_dataset.texts[catalog_dataset.item_ids.index(bundle.item_ids[5])]
    assert client.put("/items/limited", headers=ADMIN, json={"title": "Limited edition", "text": text,
                                                            "attributes": {"style": "limited-edition"}}).status_code == 201
    history = same_topic(bundle, 5)[:4]
    only = client.post("/recommend", json={"history": history, "k": 5, "filters": {"style": "limited-edition"}}).json()
    assert [item["item_id"] for item in only["items"]] == ["limited"] and only["items"][0]["score"] is not None
    assert any("only 1 item(s) match" in w for w in only["warnings"])

    assert client.delete("/items/limited", headers=ADMIN).status_code == 200
    for body in ({"history": history}, {"history": ["no-such-item"]}):
        gone = client.post("/recommend", json={**body, "k": 5, "filters": {"style": "limited-edition"}}).json()
        assert gone["items"] == [] and any("no item matches" in w for w in gone["warnings"])
    kept = client.post("/recommend", json={"history": history, "k": 30, "exclude": [bundle.item_ids[0]]}).json()
    assert "limited" not in [item["item_id"] for item in kept["items"]]


@pytest.mark.slow
def test_a_full_collision_level_is_refused_with_409(client, catalog_bundle_dir, catalog_dataset) -> None:
    bundle = load_bundle(catalog_bundle_dir)
    text = catalog_dataset.texts[3]
    prefix = bundle.semantic_ids[3, :-1]
    free = 8 - int((bundle.semantic_ids[:, :-1] == prefix).all(1).sum())  # the collision level holds 8
    codes = []
    for n in range(free):
        response = client.put(f"/items/same-{n}", headers=ADMIN, json={"title": "same", "text": text})
        assert response.status_code == 201, response.text
        codes.append(tuple(response.json()["codes"]))
    assert len(set(codes)) == free  # each took a slot of its own
    full = client.put("/items/one-too-many", headers=ADMIN, json={"title": "same", "text": text})
    assert full.status_code == 409
    assert "collision level" in full.json()["detail"] and str(prefix.tolist()) in full.json()["detail"]
    assert client.get("/items/one-too-many", headers=ADMIN).status_code == 404
    # Updating an added item's title with the same text keeps its slot.
    updated = client.put("/items/same-0", headers=ADMIN, json={"title": "renamed", "text": text})
    assert updated.status_code == 200 and tuple(updated.json()["codes"]) == codes[0]


@pytest.mark.slow
def test_bad_requests_say_what_to_fix(client) -> None:
    good = {"title": "t", "text": "a text"}
    assert client.put("/items/x", json=good).status_code == 401
    assert client.put("/items/x", json=good, headers={"Authorization": "Bearer wrong"}).status_code == 403
    blank = client.put("/items/x", json={"title": "t", "text": "   "}, headers=ADMIN)
    assert blank.status_code == 422 and "body.text" in blank.json()["detail"]
    assert client.put("/items/x", json={"title": "t"}, headers=ADMIN).status_code == 422
    bad_attribute = client.put("/items/x", json=good | {"attributes": {"brand": 3}}, headers=ADMIN)
    assert bad_attribute.status_code == 422 and "attributes" in bad_attribute.json()["detail"]
    assert client.put("/items/x", json=good | {"colour": "red"}, headers=ADMIN).status_code == 422
    missing = client.get("/items/never-added", headers=ADMIN)
    assert missing.status_code == 404 and "PUT /items" in missing.json()["detail"]
    assert client.delete("/items/never-added", headers=ADMIN).status_code == 404
    unknown = client.post("/users/u1/events", json={"item_ids": ["never-added"]})
    assert unknown.status_code == 422 and "PUT /items" in unknown.json()["detail"]


@pytest.mark.slow
def test_admin_routes_are_off_without_a_token(catalog_bundle_dir, state_dir) -> None:
    with TestClient(create_app(make_settings(catalog_bundle_dir, catalog_state_dir=state_dir))) as client:
        response = client.put("/items/x", json={"title": "t", "text": "a"}, headers=ADMIN)
        assert response.status_code == 404 and "GENREC_ADMIN_TOKEN" in response.json()["detail"]


@pytest.mark.slow
def test_changes_survive_a_restart_in_the_state_file(catalog_bundle_dir, catalog_dataset, state_dir) -> None:
    settings = make_settings(catalog_bundle_dir, admin_token=TOKEN, catalog_state_dir=state_dir)
    with TestClient(create_app(settings)) as client:
        first = client.put("/items/kept", headers=ADMIN, json={"title": "kept", "text": catalog_dataset.texts[9]}).json()
        client.put("/items/dropped", headers=ADMIN, json={"title": "dropped", "text": catalog_dataset.texts[9]})
        client.delete("/items/dropped", headers=ADMIN)
    assert len(list(state_dir.rglob("*.jsonl"))) == 1
    bundle = load_bundle(catalog_bundle_dir)  # untouched: nothing written inside it, checksums hold
    assert {p.name for p in catalog_bundle_dir.iterdir()} == {*bundle.manifest.files, "manifest.json"}
    with TestClient(create_app(settings)) as client:
        kept = client.get("/items/kept", headers=ADMIN).json()
        assert kept["codes"] == first["codes"] and kept["state"] == "active"
        assert client.get("/items/dropped", headers=ADMIN).json()["state"] == "deleted"
        assert client.post("/users/u1/events", json={"item_ids": ["kept"]}).status_code == 200


def test_a_torn_last_line_of_the_state_file_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "catalog.jsonl"
    record = ItemRecord("a", "A", "text", {}, (1, 2, 3), ACTIVE, 1.0)
    path.write_text(record.to_json() + "\n" + record.to_json()[:20])
    assert asyncio.run(FileCatalogStore(path).load()) == {"a": record}


@pytest.mark.slow
def test_replicas_sharing_redis_apply_each_others_changes_and_never_share_a_slot(catalog_bundle_dir, catalog_dataset,
                                                                                 redis_server) -> None:
    bundle = load_bundle(catalog_bundle_dir)
    key = f"test-{tempfile.mktemp(dir='')}"

    async def scenario() -> None:
        engines = [OnnxBeamEngine(bundle, providers="cpu") for _ in range(2)]
        first, second = (Catalog(bundle, engine, RedisCatalogStore.from_url(redis_server, key), poll_s=60)
                         for engine in engines)
        await first.start()
        await second.start()
        try:
            text = catalog_dataset.texts[11]
            info, _ = await first.put("from-a", "A", text, {})
            assert second.current.index_of.get("from-a") is None
            assert await second.sync()  # what the poll does every catalog_poll_s
            assert second.current.semantic_ids[second.current.index_of["from-a"]].tolist() == info.codes
            # `second` has not seen the next one yet: its claim of that slot fails in Redis, it takes the next.
            taken, _ = await first.put("from-a-2", "A2", text, {})
            mine, _ = await second.put("from-b", "B", text, {})
            assert mine.codes[:-1] == taken.codes[:-1] and mine.codes != taken.codes
            await first.delete("from-a")
            await second.sync()
            assert not second.current.live[second.current.index_of["from-a"]]
            # A restarted replica re-applies everything from Redis.
            third = Catalog(bundle, OnnxBeamEngine(bundle, providers="cpu"), RedisCatalogStore.from_url(redis_server, key))
            await third.start()
            assert {"from-a", "from-a-2", "from-b"} <= set(third.current.index_of)
            assert third.current.num_live == bundle.num_items + 2
            await third.close()
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def test_a_claimed_slot_is_refused_to_another_item(redis_server) -> None:
    async def scenario() -> None:
        store = RedisCatalogStore.from_url(redis_server, f"claims-{tempfile.mktemp(dir='')}")
        try:
            await store.write(ItemRecord("a", "A", "t", {}, (1, 2, 0), ACTIVE, 1.0), (1, 2, 0), None)
            with pytest.raises(SlotTaken):
                await store.write(ItemRecord("b", "B", "t", {}, (1, 2, 0), ACTIVE, 2.0), (1, 2, 0), None)
            assert set(await store.load()) == {"a"} and await store.version() == 1
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_batch_never_sees_half_a_catalog(catalog_bundle_dir) -> None:
    """Searches while catalogs are swapped: every answer comes whole from one of them (no errors, no
    index outside it, never an item that catalog has deleted)."""
    bundle = load_bundle(catalog_bundle_dir)
    engine = OnnxBeamEngine(bundle, providers="cpu")
    view = initial_view(bundle)
    new_codes = (*bundle.semantic_ids[0, :-1].tolist(), 7)
    added = apply_records(view, [ItemRecord("n", "N", "t", {}, new_codes, ACTIVE, 1.0)], bundle.popularity)
    deleted_live = added.live.copy()
    deleted_live[: bundle.num_items // 2] = False  # half the catalog gone
    catalogs = [engine.prepare_catalog(view.semantic_ids, view.live, 1),
                engine.prepare_catalog(added.semantic_ids, deleted_live, 2)]
    histories = [np.asarray([i, (i + 1) % bundle.num_items], dtype=np.int64) for i in range(8)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for catalog in catalogs:
                engine.swap_catalog(catalog)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(60):
            items, _ = engine.search(histories)
            found = items[items >= 0]
            assert found.max() <= bundle.num_items  # the added item is index N
            # The first catalog lacks item N, the second the first half: one batch never holds both.
            assert not ((found == bundle.num_items).any() and (found < bundle.num_items // 2).any())
    except BaseException as error:  # noqa: BLE001 - reported below
        errors.append(error)
    finally:
        stop.set()
        swapper.join()
    assert not errors, errors[0]


@pytest.mark.slow
def test_item_head_graphs_take_new_items_and_old_ones_say_how_to_upgrade(tmp_path: Path) -> None:
    """With history item ids and an item head, an index beyond the exported catalog must not reach the
    item tables: histories feed it as the padding row, the head gives it a neutral bonus. A graph
    exported before that guard is refused with the command that rebuilds it."""
    bundle_dir = build_catalog_bundle(tmp_path / "head", epochs=2, history_item_ids=True, item_head=True)
    data = json.loads((bundle_dir / "manifest.json").read_text())
    assert data["model"]["config"]["item_head"] and data["model"]["config"]["history_item_ids"]
    settings = make_settings(bundle_dir, admin_token=TOKEN, catalog_state_dir=tmp_path / "state")
    from training.data import load_dataset

    texts = load_dataset(str(tmp_path / "head" / "data")).texts
    with TestClient(create_app(settings)) as client:
        assert client.put("/items/h-new", headers=ADMIN, json={"title": "n", "text": texts[2]}).status_code == 201
        answer = client.post("/recommend", json={"history": ["h-new", "i2", "h-new"], "k": 30})
        assert answer.status_code == 200 and answer.json()["strategy"] == "generative"
    # The same bundle with the guard's stamp removed, as graphs exported before it were.
    old_dir = Path(shutil.copytree(bundle_dir, tmp_path / "old" / "tiny" / bundle_dir.name))
    graph = onnx.load(str(old_dir / "beam_search.onnx"))
    kept = [p for p in graph.metadata_props if p.key != NEW_ITEM_INDICES_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(old_dir / "beam_search.onnx"))
    manifest = json.loads((old_dir / "manifest.json").read_text())
    manifest["files"] = file_digests(old_dir, manifest["files"])
    (old_dir / "manifest.json").write_text(json.dumps(manifest))
    settings = make_settings(old_dir, admin_token=TOKEN, catalog_state_dir=tmp_path / "state-old")
    with TestClient(create_app(settings)) as client:
        refused = client.put("/items/h-new", headers=ADMIN, json={"title": "n", "text": texts[2]})
        assert refused.status_code == 409 and "genrec export --bundle" in refused.json()["detail"]
        assert client.put("/items/i2", headers=ADMIN, json={"title": "renamed", "text": "x"}).status_code == 200


@pytest.mark.slow
def test_an_unreachable_catalog_store_refuses_changes_with_503_and_serving_goes_on(catalog_bundle_dir, dead_redis_url,
                                                                                   catalog_dataset) -> None:
    settings = make_settings(catalog_bundle_dir, admin_token=TOKEN, redis_url=dead_redis_url)
    with TestClient(create_app(settings)) as client:
        response = client.put("/items/while-down", headers=ADMIN, json={"title": "t", "text": catalog_dataset.texts[4]})
        assert response.status_code == 503 and "nothing was changed" in response.json()["detail"]
        assert response.headers["Retry-After"]
        assert client.get("/items/while-down", headers=ADMIN).status_code == 404
        assert client.post("/recommend", json={"history": ["i4"], "k": 5}).status_code == 200
