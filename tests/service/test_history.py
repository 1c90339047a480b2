from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import redis

from service.history import CoalescingHistoryReader, HistoryStoreError, InMemoryHistoryStore, RedisHistoryStore
from tests.service.conftest import LocalRedisCluster, StoppableRedis


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


# --- Redis store, against a real redis-server and a real 3-node Redis Cluster -------------------

@dataclass(frozen=True)
class RedisTarget:
    url: str
    cluster: bool

    def store(self, **kwargs) -> RedisHistoryStore:
        return RedisHistoryStore.from_url(self.url, cluster=self.cluster, **kwargs)

    def raw_client(self) -> redis.Redis | redis.RedisCluster:
        """A plain synchronous client, to look at what the store wrote."""
        if self.cluster:
            return redis.RedisCluster.from_url(self.url, decode_responses=True)
        return redis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture(params=["standalone", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Each Redis store test runs against one redis-server and against the local Redis Cluster."""
    if request.param == "cluster":
        return RedisTarget(request.getfixturevalue("redis_cluster").url, cluster=True)
    return RedisTarget(request.getfixturevalue("redis_server"), cluster=False)


def test_redis_store_layout_and_round_trip(redis_target: RedisTarget) -> None:
    async def main() -> None:
        store = redis_target.store(max_items=3, ttl_s=120, timeout_ms=200)
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
        raw = redis_target.raw_client()
        try:  # one LIST per user (the user id as hash tag), newest first, trimmed, with a ttl
            assert raw.lrange("genrec:history:{alice}", 0, -1) == ["d", "c", "b"]
            assert 0 < raw.ttl("genrec:history:{alice}") <= 120
        finally:
            raw.delete("genrec:history:{alice}")
            raw.delete("genrec:history:{bob}")
            raw.close()

    asyncio.run(main())


def test_redis_server_error_is_a_store_error(redis_target: RedisTarget) -> None:
    async def main() -> None:
        raw = redis_target.raw_client()
        raw.set("genrec:history:{wrongtype}", "not a list")
        store = redis_target.store(max_items=3, ttl_s=60, timeout_ms=200)
        try:
            with pytest.raises(HistoryStoreError, match="redis error"):
                await store.get_many(["wrongtype"])
        finally:
            await store.close()
            raw.delete("genrec:history:{wrongtype}")
            raw.close()

    asyncio.run(main())


def test_cluster_keys_a_user_by_hash_tag_and_spreads_users_over_every_node(redis_cluster: LocalRedisCluster) -> None:
    store = RedisHistoryStore.from_url(redis_cluster.url, cluster=True, max_items=3, ttl_s=60, timeout_ms=200)
    raw = redis.RedisCluster.from_url(redis_cluster.url)
    try:
        # The user's event ids (idempotency) live on the history's slot: one script touches both.
        assert raw.keyslot(store.key("alice")) == raw.keyslot(store.event_ids_key("alice")) == raw.keyslot("alice")
        owners = {raw.get_node_from_key(store.key(f"user-{i}")).port for i in range(60)}
        assert owners == {port for port, _ in redis_cluster.ports}
    finally:
        raw.close()


def test_cluster_history_survives_a_node_restart(redis_cluster: LocalRedisCluster) -> None:
    """Kill the node that owns a user's slot by PID, start it again from its folder (nodes.conf and
    append-only file): while it is down its users' reads fail as store errors (the route answers
    degraded), other nodes' users are still served, and a read mixing both fails whole; once it is
    back the same store reads the history again."""
    async def main() -> None:
        raw = redis.RedisCluster.from_url(redis_cluster.url)
        store = RedisHistoryStore.from_url(redis_cluster.url, cluster=True, max_items=5, ttl_s=600, timeout_ms=300)
        port_of_node = {port: node for node, (port, _) in enumerate(redis_cluster.ports)}
        # A user whose slot is not on the node the URL names, so the client's seed node stays up.
        users = [f"restart-{i}" for i in range(40)]
        owner = {u: port_of_node[raw.get_node_from_key(store.key(u)).port] for u in users}
        victim = next(u for u in users if owner[u] != 0)
        survivor = next(u for u in users if owner[u] not in (owner[victim],))
        node = owner[victim]
        try:
            await store.append(victim, ["a", "b"])
            await store.append(survivor, ["x"])
            redis_cluster.kill_node(node)
            with pytest.raises(HistoryStoreError):
                await store.get_many([victim])
            assert await store.get_many([survivor]) == {survivor: ["x"]}
            with pytest.raises(HistoryStoreError):  # one pipeline over both nodes fails whole
                await store.get_many([survivor, victim])

            redis_cluster.start_node(node)
            redis_cluster.wait_healthy()
            history = None
            for _ in range(50):  # the client finds the node again after a failed attempt or two
                try:
                    history = await store.get_many([victim, survivor])
                    break
                except HistoryStoreError:
                    await asyncio.sleep(0.1)
            assert history == {victim: ["a", "b"], survivor: ["x"]}
            await store.append(victim, ["c"])
            assert (await store.get_many([victim]))[victim] == ["a", "b", "c"]
        finally:
            await store.close()
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
