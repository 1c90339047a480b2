"""User histories: external item ids (never codes, which a retrained tokenizer renumbers).

Stores return histories oldest first, the order the model reads them. Two stores: an in-process one
(the embedded default) and Redis (one LIST per user, newest first). Any store failure surfaces as
HistoryStoreError, so the route can answer without the stored history and mark the response degraded;
HistoryStoreUnavailable (a subclass) says the store could not be reached, so a write may be spooled
and retried (service/spool.py). Writes with an event id are idempotent: each store remembers the
user's last `idempotency_window` event ids and does not append an event it has seen.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")


class HistoryStoreError(Exception):
    """The store could not answer in time or at all."""


class HistoryStoreUnavailable(HistoryStoreError):
    """The store could not be reached or did not answer in time (connection refused, timeout)."""


class HistoryStore(Protocol):
    backend: str  # "memory" or "redis", for /info and logs

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        """History of each user, oldest first, at most max_items; [] for unknown users."""
        ...

    async def append(self, user_id: str, item_ids: Sequence[str], event_id: str | None = None) -> bool:
        """Append events given oldest first; keeps the newest max_items. With an event_id already
        among the user's recent ones, appends nothing and returns False (a retried write)."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class InMemoryHistoryStore:
    """Per-process store: bounded per user (max_items) and in users (LRU beyond max_users)."""

    backend = "memory"

    def __init__(
        self,
        max_items: int,
        ttl_s: float | None = None,
        max_users: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        idempotency_window: int = 128,
    ) -> None:
        self.max_items = max_items
        self.idempotency_window = idempotency_window
        self.ttl_s = ttl_s
        self.max_users = max_users
        self._clock = clock
        self._users: OrderedDict[str, tuple[deque[str], float]] = OrderedDict()  # user -> (items, expires_at)
        self._event_ids: dict[str, deque[str]] = {}  # user -> recent event ids, dropped with the user

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        now = self._clock()
        result: dict[str, list[str]] = {}
        for user_id in user_ids:
            entry = self._users.get(user_id)
            if entry is not None and entry[1] <= now:
                del self._users[user_id]
                entry = None
            result[user_id] = list(entry[0]) if entry is not None else []
        return result

    async def append(self, user_id: str, item_ids: Sequence[str], event_id: str | None = None) -> bool:
        if not item_ids:
            return True
        now = self._clock()
        entry = self._users.pop(user_id, None)
        live = entry is not None and entry[1] > now
        seen = self._event_ids.get(user_id) if live else None
        if event_id is not None and seen is not None and event_id in seen:
            self._users[user_id] = entry  # type: ignore[assignment]  # a duplicate changes nothing
            return False
        if event_id is not None:
            if seen is None:
                seen = self._event_ids[user_id] = deque(maxlen=self.idempotency_window)
            seen.append(event_id)
        elif not live:
            self._event_ids.pop(user_id, None)
        items = entry[0] if live else deque(maxlen=self.max_items)
        items.extend(item_ids)
        expires_at = now + self.ttl_s if self.ttl_s is not None else float("inf")
        self._users[user_id] = (items, expires_at)  # re-inserted last: most recently used
        while len(self._users) > self.max_users:
            evicted, _ = self._users.popitem(last=False)
            self._event_ids.pop(evicted, None)
        return True

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._users.clear()
        self._event_ids.clear()


# One event, atomically: skip it if its id is among the user's recent event ids, else remember the id
# and push the items (KEYS[1] history, KEYS[2] event ids; ARGV: event id, max_items, ttl, window, items...).
_IDEMPOTENT_APPEND = """
if redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('LPUSH', KEYS[1], unpack(ARGV, 5))
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class RedisHistoryStore:
    """Redis LIST `genrec:history:{<user_id>}`, newest first, on one Redis or a Redis Cluster; beside it
    the LIST `genrec:event-ids:{<user_id>}` of the user's recent event ids. The braces are a Redis
    Cluster hash tag: every key of a user hashes to the slot of the user id, so the MULTI of a write
    and the script that touches both keys stay on one node.

    Writes: LPUSH + LTRIM + EXPIRE in one MULTI, or with an event id one Lua script that also checks
    and records the id. Reads: one pipeline of LRANGEs for many users (on a cluster the client splits
    it by node). Each attempt is bounded by timeout_s; at most `retries` more attempts (reads and
    writes with an event id: on any connection or timeout error; other writes only on connection
    errors, since a timed-out LPUSH may have happened).
    """

    backend = "redis"
    key_prefix = "genrec:history:"

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, *, max_items: int, ttl_s: int, timeout_s: float,
                 retries: int = 1, idempotency_window: int = 128) -> None:
        self._client = client
        self.max_items = max_items
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.retries = retries
        self.idempotency_window = idempotency_window
        self._idempotent_append = client.register_script(_IDEMPOTENT_APPEND)

    @classmethod
    def from_url(cls, url: str, *, max_items: int, ttl_s: int, timeout_ms: float, retries: int = 1,
                 idempotency_window: int = 128, cluster: bool = False) -> RedisHistoryStore:
        """cluster: `url` names any node of a Redis Cluster; the client discovers the others and
        follows slot moves."""
        timeout_s = timeout_ms / 1000.0
        options = dict(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # retries are ours (at most one), not redis-py's backoff
            decode_responses=True,
        )
        client = aioredis.RedisCluster.from_url(url, **options) if cluster else aioredis.from_url(url, **options)
        return cls(client, max_items=max_items, ttl_s=ttl_s, timeout_s=timeout_s, retries=retries,
                   idempotency_window=idempotency_window)

    def key(self, user_id: str) -> str:
        return f"{self.key_prefix}{{{user_id}}}"

    def event_ids_key(self, user_id: str) -> str:
        return f"genrec:event-ids:{{{user_id}}}"  # the history key's hash tag: same slot

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}

        async def read() -> list[list[str]]:
            if len(unique) == 1:  # one command: a pipeline's bookkeeping costs more than it saves
                return [await self._client.lrange(self.key(unique[0]), 0, self.max_items - 1)]
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in unique:
                    pipe.lrange(self.key(user_id), 0, self.max_items - 1)
                return await pipe.execute()

        rows = await self._attempt(read, retry_on_timeout=True)
        return {user_id: row[::-1] for user_id, row in zip(unique, rows)}  # stored newest first

    async def append(self, user_id: str, item_ids: Sequence[str], event_id: str | None = None) -> bool:
        if not item_ids:
            return True
        if event_id is not None:
            return (await self.append_many([(user_id, item_ids, event_id)]))[0]
        key = self.key(user_id)

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lpush(key, *item_ids)  # pushed one by one to the head: the last given ends up first
                pipe.ltrim(key, 0, self.max_items - 1)
                pipe.expire(key, self.ttl_s)
                await pipe.execute()

        await self._attempt(write, retry_on_timeout=False)
        return True

    async def append_many(self, events: Sequence[tuple[str, Sequence[str], str]]) -> list[bool]:
        """(user_id, item_ids oldest first, event_id) events in order, in one round trip (a pipeline
        of the idempotent script); True where appended, False where the event id was seen already.
        Safe to retry after a timeout: a repeated event is skipped."""

        def call(user_id: str, item_ids: Sequence[str], event_id: str, client: Any) -> Awaitable[Any]:
            newest = list(item_ids)[-self.max_items:]  # older ones would be trimmed at once
            return self._idempotent_append(keys=[self.key(user_id), self.event_ids_key(user_id)],
                                           args=[event_id, self.max_items, self.ttl_s, self.idempotency_window, *newest],
                                           client=client)

        async def write() -> list[bool]:
            if isinstance(self._client, aioredis.RedisCluster):  # cluster pipelines carry no scripts: one call each, in order
                return [bool(await call(*event, client=self._client)) for event in events]
            async with self._client.pipeline(transaction=False) as pipe:
                for event in events:
                    await call(*event, client=pipe)
                return [bool(result) for result in await pipe.execute()]

        return await self._attempt(write, retry_on_timeout=True)

    async def ping(self) -> bool:
        try:
            return bool(await self._attempt(self._client.ping, retry_on_timeout=True))
        except HistoryStoreError:
            return False

    async def close(self) -> None:
        await self._client.aclose()

    async def _attempt(self, operation: Callable[[], Awaitable[T]], *, retry_on_timeout: bool) -> T:
        last_error: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await operation()
            except (RedisTimeoutError, TimeoutError) as error:  # before OSError: TimeoutError is one
                last_error = error
                if not retry_on_timeout:
                    break
            except (RedisConnectionError, OSError) as error:
                last_error = error
            except RedisError as error:  # a server-side error (e.g. WRONGTYPE): retrying will not help
                raise HistoryStoreError(f"redis error: {error}") from error
        raise HistoryStoreUnavailable(f"redis unavailable: {type(last_error).__name__}: {last_error}") from last_error


class CoalescingHistoryReader:
    """Reads issued in the same event-loop turn share one store.get_many (one Redis pipeline), so
    a burst of requests, the ones that will share a micro-batch, costs one round trip."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self._pending: dict[str, list[asyncio.Future[list[str]]]] = {}
        self._flush_scheduled = False
        self._reads: set[asyncio.Task[None]] = set()  # strong refs until done

    async def get(self, user_id: str) -> list[str]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str]] = loop.create_future()
        self._pending.setdefault(user_id, []).append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        self._flush_scheduled = False
        task = asyncio.ensure_future(self._read(pending))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _read(self, pending: dict[str, list[asyncio.Future[list[str]]]]) -> None:
        try:
            histories = await self.store.get_many(list(pending))
        except Exception as error:
            failure = error if isinstance(error, HistoryStoreError) else HistoryStoreError(str(error))
            for futures in pending.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(failure)
            return
        for user_id, futures in pending.items():
            for future in futures:
                if not future.done():
                    future.set_result(list(histories.get(user_id, [])))
