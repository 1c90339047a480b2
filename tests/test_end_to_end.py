"""The whole path: train a tiny bundle, serve it from a real process with a real Redis, ask it.

Checks what a user relies on: k distinct valid items, no history items when excluded, the same
top-k as the offline (torch) evaluator, events written to Redis and used by the next request,
and the genrec_ metrics after traffic.
"""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from training.export import load_recommender
from training.evaluation import recommend_topk

pytestmark = pytest.mark.slow


@pytest.fixture
def served(tiny_bundle: Path, redis_server: str, start_service) -> str:
    return start_service(tiny_bundle, redis_url=redis_server)


def item_table(bundle: Path) -> list[dict]:
    return [json.loads(line) for line in (bundle / "items.jsonl").read_text().splitlines()]


def offline_topk(bundle: Path, history_ids: list[str], k: int) -> list[str]:
    items = item_table(bundle)
    index = {row["item_id"]: i for i, row in enumerate(items)}
    semantic_ids = np.load(bundle / "semantic_ids.npy").astype(np.int64)
    beam = json.loads((bundle / "manifest.json").read_text())["beam_size"]
    top, _ = recommend_topk(load_recommender(bundle), [np.array([index[i] for i in history_ids])], semantic_ids, beam)
    return [items[i]["item_id"] for i in top[0][:k]]


def test_recommend_matches_offline_evaluator_and_excludes_history(served: str, tiny_bundle: Path) -> None:
    items = item_table(tiny_bundle)
    history = [items[3]["item_id"], items[4]["item_id"], items[5]["item_id"]]
    with httpx.Client(base_url=served, timeout=10) as client:
        raw = client.post("/recommend", json={"history": history, "k": 10, "exclude_history": False}).json()
        excluded = client.post("/recommend", json={"history": history, "k": 10}).json()
    assert raw["strategy"] == "generative" and not raw["degraded"]
    assert [i["item_id"] for i in raw["items"]] == offline_topk(tiny_bundle, history, 10)

    ids = [i["item_id"] for i in excluded["items"]]
    valid = {row["item_id"] for row in items}
    assert len(ids) == 10 and len(set(ids)) == 10 and set(ids) <= valid
    assert not set(ids) & set(history)
    titles = {row["item_id"]: row["title"] for row in items}
    assert all(i["title"] == titles[i["item_id"]] for i in excluded["items"])


def test_events_go_to_redis_and_drive_the_next_request(served: str, tiny_bundle: Path, redis_server: str) -> None:
    items = item_table(tiny_bundle)
    events = [items[10]["item_id"], items[11]["item_id"], items[12]["item_id"]]
    with httpx.Client(base_url=served, timeout=10) as client:
        before = client.post("/recommend", json={"user_id": "e2e-user", "k": 10}).json()
        assert before["strategy"] == "popular"  # no history yet
        response = client.post("/users/e2e-user/events", json={"item_ids": events})
        assert response.status_code == 200, response.text
        stored = redis.Redis.from_url(redis_server, decode_responses=True).lrange("genrec:history:{e2e-user}", 0, -1)
        assert stored == events[::-1]  # newest first
        by_user = client.post("/recommend", json={"user_id": "e2e-user", "k": 10}).json()
        by_history = client.post("/recommend", json={"history": events, "k": 10}).json()
    assert by_user["strategy"] == "generative"
    assert [i["item_id"] for i in by_user["items"]] == [i["item_id"] for i in by_history["items"]]


def test_metrics_after_traffic(served: str) -> None:
    with httpx.Client(base_url=served, timeout=10) as client:
        client.post("/recommend", json={"history": ["no-such-item"], "k": 5})
        text = client.get("/metrics").text
    for name in [
        "genrec_request_duration_seconds_bucket", "genrec_requests_total", "genrec_batch_size_bucket",
        "genrec_queue_size", "genrec_requests_in_flight", "genrec_stage_duration_seconds_bucket",
        "genrec_history_store_hits_total", "genrec_history_store_misses_total", "genrec_model_info",
    ]:
        assert name in text, f"{name} missing from /metrics"
