"""Events are never lost once acknowledged, and never applied twice: the spool file, the idempotent
stores, and the service's event route through real Redis crashes (SIGKILL), hangs (SIGSTOP) and
restarts."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from redis.crc import key_slot

from service.app import create_app
from service.bundle import Bundle
from service.history import InMemoryHistoryStore, RedisHistoryStore
from service.spool import EventSpool, SpoolCorrupt, SpooledEvent, SpoolFull
from tests.service.conftest import StoppableRedis
from tests.service.test_api import make_settings

REPLAY_WAIT_S = 15.0  # generous bound for a loaded CI machine; the replay retries every 0.25-2 s


def event(n: int, user: str = "u1") -> SpooledEvent:
    return SpooledEvent(user, f"e{n}", (f"item-{n}",))


def wait_until(condition: Callable[[], bool], timeout_s: float = REPLAY_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- the spool file -------------------------------------------------------------------------------

def test_the_spool_keeps_events_in_order_across_restarts_and_empties_when_replayed(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "events.jsonl"

    async def write() -> None:
        spool = EventSpool(path, max_bytes=1 << 20)
        spool.open()
        results = await asyncio.gather(*(spool.append(event(n)) for n in range(5)))  # one group commit
        assert results == [True] * 5
        assert await spool.append(event(2)) is False  # same user and event id: already spooled
        await spool.mark_replayed(2)
        spool.close()

    asyncio.run(write())

    async def reopen() -> None:
        spool = EventSpool(path, max_bytes=1 << 20)
        spool.open()  # as after a crash: what was not replayed is there, in order
        assert [e.event_id for e in spool.peek(10)] == ["e2", "e3", "e4"]
        assert await spool.append(event(3)) is False  # the dedup index is rebuilt too
        await spool.mark_replayed(3)
        assert spool.pending == 0 and spool.size_bytes == 0
        spool.close()

    asyncio.run(reopen())
    assert path.stat().st_size == 0  # truncated once everything is in Redis
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_torn_last_line_is_cut_and_a_bad_line_before_it_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = event(1).line()
    path.write_bytes(good + b'{"user_id": "u1", "event_id": "e2", "ite')  # a crash cut the last write
    spool = EventSpool(path, max_bytes=1 << 20)
    spool.open()
    assert [e.event_id for e in spool.peek(10)] == ["e1"]
    spool.close()
    assert path.read_bytes() == good

    path.write_bytes(b"not json\n" + good)
    with pytest.raises(SpoolCorrupt, match="line at byte 0 is not a spooled event"):
        EventSpool(path, max_bytes=1 << 20).open()


def test_the_spool_is_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        line = len(event(0).line())
        spool = EventSpool(tmp_path / "events.jsonl", max_bytes=2 * line)
        spool.open()
        assert await spool.append(event(0)) and await spool.append(event(1))
        with pytest.raises(SpoolFull, match="GENREC_EVENT_SPOOL_MAX_BYTES"):
            await spool.append(event(2))
        assert spool.pending == 2
        spool.close()

    asyncio.run(main())


# --- idempotent stores ----------------------------------------------------------------------------

def test_the_in_memory_store_skips_a_seen_event_id() -> None:
    async def main() -> None:
        store = InMemoryHistoryStore(max_items=10, idempotency_window=2)
        assert await store.append("u1", ["a"], event_id="e1")
        assert not await store.append("u1", ["a"], event_id="e1")
        assert await store.append("u2", ["a"], event_id="e1")  # ids are per user
        assert await store.append("u1", ["b"], event_id="e2") and await store.append("u1", ["c"], event_id="e3")
        assert await store.append("u1", ["a"], event_id="e1")  # out of the window of 2: applied again
        assert (await store.get_many(["u1"]))["u1"] == ["a", "b", "c", "a"]

    asyncio.run(main())


def test_the_redis_store_skips_a_seen_event_id_atomically(redis_server: str) -> None:
    async def main() -> None:
        store = RedisHistoryStore.from_url(redis_server, max_items=3, ttl_s=120, timeout_ms=500, idempotency_window=2)
        try:
            assert await store.append("idem", ["a", "b"], event_id="e1")
            assert not await store.append("idem", ["a", "b"], event_id="e1")
            assert await store.append_many([("idem", ["c"], "e2"), ("idem", ["c"], "e2"), ("idem", ["d"], "e3")]) == [
                True, False, True]
            assert (await store.get_many(["idem"]))["idem"] == ["b", "c", "d"]
        finally:
            await store.close()
        raw = redis.Redis.from_url(redis_server, decode_responses=True)
        ids_key = "genrec:event-ids:{idem}"
        try:  # the ids live beside the history, newest first, trimmed to the window, with the same ttl
            assert raw.lrange(ids_key, 0, -1) == ["e3", "e2"]
            assert 0 < raw.ttl(ids_key) <= 120
            # the braces put both keys in one Redis Cluster slot, so one script may touch both
            assert key_slot(ids_key.encode()) == key_slot(b"genrec:history:{idem}")
        finally:
            raw.delete("genrec:history:{idem}", "genrec:event-ids:{idem}")
            raw.close()

    asyncio.run(main())


# --- the event route through Redis outages --------------------------------------------------------

def known_items(bundle: Bundle, n: int) -> list[str]:
    return [bundle.item_ids[i % bundle.num_items] for i in range(n)]


def post_event(client: TestClient, user: str, item: str, event_id: str) -> dict:
    response = client.post(f"/users/{user}/events", json={"item_ids": [item]}, headers={"Idempotency-Key": event_id})
    assert response.status_code == 200, response.text
    return response.json()


def stored_history(url: str, user: str) -> list[str]:
    raw = redis.Redis.from_url(url, decode_responses=True)
    try:
        return raw.lrange(f"genrec:history:{{{user}}}", 0, -1)[::-1]  # oldest first
    finally:
        raw.close()


def spool_pending(client: TestClient) -> int:
    return client.app.state.genrec.serving.events.spool.pending  # type: ignore[attr-defined]


def test_events_acknowledged_while_redis_is_down_are_in_redis_after_in_order_once(
    demo_bundle_dir: Path, demo_bundle: Bundle, tmp_path: Path
) -> None:
    server = StoppableRedis(tmp_path, aof=True)
    items = known_items(demo_bundle, 20)  # max_history of the demo bundle: nothing is trimmed away
    try:
        settings = make_settings(demo_bundle_dir, redis_url=server.url, redis_timeout_ms=100)
        with TestClient(create_app(settings)) as client:
            before = [post_event(client, "carol", items[n], f"ev-{n}") for n in range(4)]
            assert {r["status"] for r in before} == {"stored"}

            server.stop()  # SIGKILL: a crash
            during = [post_event(client, "carol", items[n], f"ev-{n}") for n in range(4, 14)]
            assert {r["status"] for r in during} == {"spooled"}
            retried = post_event(client, "carol", items[9], "ev-9")  # a client retry of an acknowledged event
            assert retried["duplicate"] is True and retried["appended"] == 0
            assert spool_pending(client) == 10

            server.start()  # AOF: what was acknowledged before the crash is still there
            wait_until(lambda: spool_pending(client) == 0)
            after = post_event(client, "carol", items[14], "ev-14")
            assert after["status"] == "stored"
            assert post_event(client, "carol", items[5], "ev-5")["duplicate"] is True  # replayed ids are known

        assert stored_history(server.url, "carol") == items[:15]  # in order, each once
    finally:
        server.stop()


def test_events_are_spooled_while_redis_hangs_and_written_when_it_answers(
    demo_bundle_dir: Path, demo_bundle: Bundle, stoppable_redis: StoppableRedis
) -> None:
    items = known_items(demo_bundle, 6)
    settings = make_settings(demo_bundle_dir, redis_url=stoppable_redis.url, redis_timeout_ms=50)
    with TestClient(create_app(settings)) as client:
        assert post_event(client, "dan", items[0], "d0")["status"] == "stored"
        stoppable_redis.pause()  # SIGSTOP: connections open, no answers
        try:
            statuses = [post_event(client, "dan", items[n], f"d{n}")["status"] for n in range(1, 5)]
        finally:
            stoppable_redis.resume()
        assert statuses == ["spooled"] * 4
        wait_until(lambda: spool_pending(client) == 0)
        assert post_event(client, "dan", items[5], "d5")["status"] == "stored"
    assert stored_history(stoppable_redis.url, "dan") == items[:6]


def test_a_spool_left_by_a_stopped_service_is_replayed_by_the_next_one(
    demo_bundle_dir: Path, demo_bundle: Bundle, stoppable_redis: StoppableRedis, tmp_path: Path
) -> None:
    items = known_items(demo_bundle, 3)
    spool_path = tmp_path / "spool" / "events.jsonl"
    settings = make_settings(demo_bundle_dir, redis_url=stoppable_redis.url, redis_timeout_ms=50,
                             event_spool_path=spool_path, drain_timeout_s=0.2)
    stoppable_redis.stop()
    with TestClient(create_app(settings)) as client:
        assert [post_event(client, "eve", item, f"x{n}")["status"] for n, item in enumerate(items)] == ["spooled"] * 3
    assert spool_path.stat().st_size > 0  # shutdown could not flush: the events wait on disk

    stoppable_redis.start()
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: spool_pending(client) == 0)
    assert stored_history(stoppable_redis.url, "eve") == items
    assert spool_path.stat().st_size == 0


def test_a_full_spool_refuses_with_503_and_acknowledges_nothing_it_cannot_keep(
    demo_bundle_dir: Path, demo_bundle: Bundle, dead_redis_url: str
) -> None:
    item = demo_bundle.item_ids[0]
    line = len(SpooledEvent("frank", "f0", (item,)).line())
    settings = make_settings(demo_bundle_dir, redis_url=dead_redis_url, redis_timeout_ms=50,
                             event_spool_max_bytes=max(4096, 3 * line))
    with TestClient(create_app(settings)) as client:
        statuses = []
        for n in range(4096 // line + 2):
            response = client.post("/users/frank/events", json={"item_ids": [item], "event_id": f"f{n}"})
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert "spool" in response.json()["detail"] and "not recorded" in response.json()["detail"]
                assert response.headers["retry-after"]
                break
        assert statuses[-1] == 503 and set(statuses[:-1]) == {200}
        assert spool_pending(client) == len(statuses) - 1  # every acknowledged one is kept
