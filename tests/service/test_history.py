from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
import redis

from service.history import CoalescingHistoryReader, HistoryStoreError, InMemoryHistoryStore, RedisHistoryStore
from tests.service.conftest import StoppableRedis


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- in-process store ---------------------------------------------------------------------------

def test_memory_store_keeps_the_newest_items_oldest_first() -> None:
    async def main() -> None:
        store = InMemoryHistoryStore(max_items=3)
        await store.append("u1", ["a", "b"])
        await store.append("u1", ["c", "d"])
        await store.append("u2", ["x"])
        assert await store.get_many(["u1", "u2", "nobody"]) == {"u1": ["b", "c", "d"], "u2": ["x"], "nobody": []}

    asyncio.run(main())


def test_memory_store_expires_histories_after_ttl() -> None:
    async def main() -> None:
        clock = FakeClock()
        store = InMemoryHistoryStore(max_items=5, ttl_s=60, clock=clock)
        await store.append("u1", ["a"])
        clock.now += 59
        await store.append("u1", ["b"])  # a write renews the ttl
        clock.now += 59
        assert (await store.get_many(["u1"]))["u1"] == ["a", "b"]
        clock.now += 2
        assert (await store.get_many(["u1"]))["u1"] == []

    asyncio.run(main())


def test_memory_store_is_bounded_in_users() -> None:
    async def main() -> None:
        store = InMemoryHistoryStore(max_items=2, max_users=2)
        for user in ("u1", "u2", "u3"):
            await store.append(user, ["i"])
        assert await store.get_many(["u1", "u2", "u3"]) == {"u1": [], "u2": ["i"], "u3": ["i"]}

    asyncio.run(main())


# --- Redis store, against a real redis-server ---------------------------------------------------

def test_redis_store_layout_and_round_trip(redis_server: str) -> None:
    async def main() -> None:
        store = RedisHistoryStore.from_url(redis_server, max_items=3, ttl_s=120, timeout_ms=200)
        try:
            await store.append("alice", ["a", "b"])
            await store.append("alice", ["c", "d"])
            await store.append("bob", ["x"])
            assert await store.get_many(["alice", "bob", "carol", "alice"]) == {
                "alice": ["b", "c", "d"], "bob": ["x"], "carol": []
            }
            assert await store.ping()
        finally:
            await store.close()
        raw = redis.Redis.from_url(redis_server, decode_responses=True)
        try:  # one LIST per user, newest first, trimmed, with a ttl
            assert raw.lrange("genrec:history:alice", 0, -1) == ["d", "c", "b"]
            assert 0 < raw.ttl("genrec:history:alice") <= 120
        finally:
            raw.delete("genrec:history:alice", "genrec:history:bob")
            raw.close()

    asyncio.run(main())


def test_redis_store_fails_fast_when_nothing_listens(dead_redis_url: str) -> None:
    async def main() -> None:
        store = RedisHistoryStore.from_url(dead_redis_url, max_items=3, ttl_s=60, timeout_ms=50)
        started = time.perf_counter()
        with pytest.raises(HistoryStoreError, match="redis unavailable"):
            await store.get_many(["u1"])
        with pytest.raises(HistoryStoreError):
            await store.append("u1", ["a"])
        assert not await store.ping()
        assert time.perf_counter() - started < 1.0
        await store.close()

    asyncio.run(main())


def test_redis_store_recovers_when_redis_comes_and_goes(stoppable_redis: StoppableRedis) -> None:
    async def main() -> None:
        store = RedisHistoryStore.from_url(stoppable_redis.url, max_items=5, ttl_s=60, timeout_ms=100)
        await store.append("u1", ["a", "b"])
        assert (await store.get_many(["u1"]))["u1"] == ["a", "b"]
        stoppable_redis.stop()
        started = time.perf_counter()
        with pytest.raises(HistoryStoreError):
            await store.get_many(["u1"])
        assert time.perf_counter() - started < 1.0  # one retry at most, each bounded
        await store.close()

    asyncio.run(main())


def test_redis_server_error_is_a_store_error(redis_server: str) -> None:
    async def main() -> None:
        raw = redis.Redis.from_url(redis_server)
        raw.set("genrec:history:wrongtype", "not a list")
        store = RedisHistoryStore.from_url(redis_server, max_items=3, ttl_s=60, timeout_ms=200)
        try:
            with pytest.raises(HistoryStoreError, match="redis error"):
                await store.get_many(["wrongtype"])
        finally:
            await store.close()
            raw.delete("genrec:history:wrongtype")
            raw.close()

    asyncio.run(main())


# --- coalescing reads ---------------------------------------------------------------------------

class CountingStore(InMemoryHistoryStore):
    def __init__(self, fail: bool = False) -> None:
        super().__init__(max_items=10)
        self.calls: list[list[str]] = []
        self.fail = fail

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        self.calls.append(list(user_ids))
        if self.fail:
            raise HistoryStoreError("down")
        return await super().get_many(user_ids)


def test_concurrent_reads_share_one_get_many() -> None:
    async def main() -> None:
        store = CountingStore()
        await store.append("u1", ["a"])
        await store.append("u2", ["b", "c"])
        reader = CoalescingHistoryReader(store)
        results = await asyncio.gather(reader.get("u1"), reader.get("u2"), reader.get("u1"), reader.get("u3"))
        assert results == [["a"], ["b", "c"], ["a"], []]
        assert store.calls == [["u1", "u2", "u3"]]
        assert await reader.get("u2") == ["b", "c"]  # a later read is a new round trip
        assert len(store.calls) == 2

    asyncio.run(main())


def test_coalesced_read_failure_reaches_every_caller() -> None:
    async def main() -> None:
        reader = CoalescingHistoryReader(CountingStore(fail=True))
        outcomes = await asyncio.gather(reader.get("u1"), reader.get("u2"), return_exceptions=True)
        assert all(isinstance(o, HistoryStoreError) for o in outcomes)

    asyncio.run(main())
