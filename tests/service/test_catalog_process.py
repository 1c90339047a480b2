"""Issue 31's first "done when", on real processes and a real Redis: add an item by its text through the
API, see it recommended for a history of similar items; delete it, see it gone; restart, and the
change is still there."""
from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from service.bundle import load_bundle

TOKEN = "process-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def answer_ids(client: httpx.Client, history: list[str], k: int) -> tuple[list[str], list[str]]:
    """(items the beam found, every item of the answer)."""
    response = client.post("/recommend", json={"history": history, "k": k})
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    return [i["item_id"] for i in items if i["score"] is not None], [i["item_id"] for i in items]


@pytest.mark.slow
def test_add_by_text_recommend_delete_restart(start_service, catalog_bundle_dir: Path, catalog_dataset,
                                              redis_server: str) -> None:
    bundle = load_bundle(catalog_bundle_dir)
    source = 12  # the new item reads like this catalog item; the history is items sharing its codes
    text = catalog_dataset.texts[catalog_dataset.item_ids.index(bundle.item_ids[source])]
    prefix = bundle.semantic_ids[source, :-1]
    history = [bundle.item_ids[i] for i in np.flatnonzero((bundle.semantic_ids[:, :-1] == prefix).all(1))][:4]
    env = {"GENREC_ADMIN_TOKEN": TOKEN, "GENREC_ONNX_PROVIDERS": "cpu", "GENREC_CATALOG_POLL_S": "0.2"}

    base_url = start_service(catalog_bundle_dir, redis_url=redis_server, env=env)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        found, _ = answer_ids(client, history, 20)
        assert "fresh-polish" not in found
        added = client.put("/items/fresh-polish", headers=ADMIN,
                           json={"title": "Fresh nail polish", "text": text, "attributes": {"category": "Nails"}})
        assert added.status_code == 201, added.text
        assert added.json()["codes"][:-1] == prefix.tolist()
        found, _ = answer_ids(client, history, 20)
        assert "fresh-polish" in found  # recommendable when PUT answers, from its text alone
        # a second added item, kept across the restart
        kept = client.put("/items/kept-polish", headers=ADMIN, json={"title": "Kept", "text": text})
        assert kept.status_code == 201

        assert client.delete("/items/fresh-polish", headers=ADMIN).status_code == 200
        _, everything = answer_ids(client, history, 100)
        assert "fresh-polish" not in everything and "kept-polish" in everything

    start_service.processes[base_url].terminate()
    start_service.processes[base_url].wait(timeout=30)
    restarted = start_service(catalog_bundle_dir, redis_url=redis_server, env=env)
    with httpx.Client(base_url=restarted, timeout=30) as client:
        assert client.get("/items/fresh-polish", headers=ADMIN).json()["state"] == "deleted"
        assert client.get("/items/kept-polish", headers=ADMIN).json()["codes"] == kept.json()["codes"]
        found, everything = answer_ids(client, history, 100)
        assert "fresh-polish" not in everything
        assert "kept-polish" in found
        events = client.post("/users/u-restart/events", json={"item_ids": ["kept-polish"]})
        assert events.status_code == 200, events.text
