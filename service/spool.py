"""Events are never lost once acknowledged: a local spool for when Redis is unreachable.

The event write path (`DurableEventWriter.write`) writes to Redis when it can. When Redis cannot be
reached (connection refused, timeout), or while anything is still spooled (so a user's events stay
in order), the event is appended to `EventSpool`, an append-only JSON-lines file, and fsynced before
the route answers `status: "spooled"`. A replay task writes spooled events into Redis in file order,
in chunks of one pipeline each, and records its progress in `<spool>.offset`; once everything is
replayed the file is truncated. Every event carries an event id (the client's, or one chosen here),
and Redis skips ids it has seen (service/history.py), so a chunk replayed twice (a crash between
writing it and recording the offset, a timeout that did reach Redis) appends nothing twice.

Bounded: an event that would grow the file past `max_bytes` is refused (SpoolFull -> 503, not
acknowledged). Appends are group-committed: the events that arrive while one fsync runs share the
next one.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.history import HistoryStore, HistoryStoreError, HistoryStoreUnavailable, RedisHistoryStore
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

OFFSET_WIDTH = 20  # the offset file holds one zero-padded decimal, rewritten in place


class SpoolFull(Exception):
    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__(f"the event spool {path} is full ({max_bytes} bytes, GENREC_EVENT_SPOOL_MAX_BYTES) while "
                         "Redis is unreachable")


class SpoolCorrupt(Exception):
    pass


@dataclass(frozen=True)
class SpooledEvent:
    user_id: str
    event_id: str
    item_ids: tuple[str, ...]

    def line(self) -> bytes:
        record = {"user_id": self.user_id, "event_id": self.event_id, "item_ids": list(self.item_ids)}
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> SpooledEvent:
        record = json.loads(line)
        return cls(str(record["user_id"]), str(record["event_id"]), tuple(str(i) for i in record["item_ids"]))


class EventSpool:
    """Append-only, fsynced file of events not yet in Redis, with the offset of the first one not
    yet replayed. One instance per file; used from one event loop."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.offset_path = self.path.with_name(self.path.name + ".offset")
        self.max_bytes = max_bytes
        self._pending: deque[tuple[SpooledEvent, int]] = deque()  # durable, not replayed: (event, end offset)
        self._ids: set[tuple[str, str]] = set()  # (user_id, event_id) of pending and committing events
        self._committing: list[tuple[SpooledEvent, asyncio.Future[None]]] = []
        self._commit_task: asyncio.Task[None] | None = None
        self._writing = 0  # events of the group being written now
        self._file_lock = asyncio.Lock()  # the file is written by one commit or one truncation at a time
        self._fd = -1
        self._size = 0  # bytes in the file, committing ones included
        self._replayed_to = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Open (create) the spool and load what a previous run left unreplayed. A torn last line (a
        write the crash cut, never acknowledged) is cut off; a bad line before the end is an error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        data = self.path.read_bytes()
        self._replayed_to = self._read_offset(len(data))
        position = self._replayed_to
        while position < len(data):
            end = data.find(b"\n", position)
            try:
                if end < 0:
                    raise ValueError("no newline")
                event = SpooledEvent.parse(data[position:end])
            except (ValueError, KeyError, TypeError) as error:
                if end < 0 or end == len(data) - 1:  # the last line: a torn write
                    log.warning("event spool %s: cutting a torn last line at byte %d (%s)", self.path, position, error)
                    os.ftruncate(self._fd, position)
                    os.fsync(self._fd)
                    data = data[:position]
                    break
                raise SpoolCorrupt(f"{self.path}: line at byte {position} is not a spooled event ({error}); "
                                   "move the file aside to start (its events are not in Redis)") from error
            self._pending.append((event, end + 1))
            self._ids.add((event.user_id, event.event_id))
            position = end + 1
        self._size = len(data)
        if self._pending:
            log.warning("event spool %s: %d event(s) from an earlier run wait for Redis", self.path, len(self._pending))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # --- state ---------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events accepted by the spool and not yet replayed (committing ones included)."""
        return len(self._pending) + len(self._committing) + self._writing

    @property
    def size_bytes(self) -> int:
        return self._size

    def peek(self, limit: int) -> list[SpooledEvent]:
        """The first `limit` durable events not yet replayed, in order."""
        return [event for event, _ in itertools.islice(self._pending, limit)]

    # --- writing -------------------------------------------------------------------------------

    async def append(self, event: SpooledEvent) -> bool:
        """Make `event` durable (fsynced) in order. False: this (user, event id) is spooled already."""
        key = (event.user_id, event.event_id)
        if key in self._ids:
            return False
        line_size = len(event.line())
        if self._size + line_size > self.max_bytes:
            raise SpoolFull(self.path, self.max_bytes)
        self._ids.add(key)
        self._size += line_size
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._committing.append((event, future))
        if self._commit_task is None:
            self._commit_task = asyncio.create_task(self._commit(), name="genrec-spool-commit")
        await future
        return True

    async def _commit(self) -> None:
        """Write and fsync everything queued, one group per fsync, until nothing is queued."""
        try:
            while self._committing:
                group, self._committing = self._committing, []
                lines = [event.line() for event, _ in group]
                self._writing = len(group)
                try:
                    async with self._file_lock:
                        start = os.fstat(self._fd).st_size
                        await asyncio.to_thread(_write_and_sync, self._fd, b"".join(lines))
                except OSError as error:
                    self._writing = 0
                    for (event, future), line in zip(group, lines):
                        self._ids.discard((event.user_id, event.event_id))
                        self._size -= len(line)
                        if not future.done():
                            future.set_exception(error)
                    continue
                self._writing = 0
                for (event, future), line in zip(group, lines):
                    start += len(line)
                    self._pending.append((event, start))
                    if not future.done():
                        future.set_result(None)
        finally:
            self._commit_task = None

    async def mark_replayed(self, count: int) -> None:
        """The first `count` pending events are in Redis: record the progress; truncate the file once
        nothing is left in it."""
        end = self._replayed_to
        for _ in range(count):
            event, end = self._pending.popleft()
            self._ids.discard((event.user_id, event.event_id))
        self._replayed_to = end
        async with self._file_lock:
            if not self.pending:
                # Events appended meanwhile wait for the lock; their bytes stay counted in _size.
                truncated, self._replayed_to = self._size, 0
                await asyncio.to_thread(self._truncate)
                self._size -= truncated
            else:
                await asyncio.to_thread(self._write_offset, end)

    def _truncate(self) -> None:
        # File first, then the offset: a crash in between leaves an offset past the end, read as 0.
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self._write_offset(0)

    def _write_offset(self, offset: int) -> None:
        fd = os.open(self.offset_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, str(offset).zfill(OFFSET_WIDTH).encode(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_offset(self, file_size: int) -> int:
        try:
            offset = int(self.offset_path.read_bytes()[:OFFSET_WIDTH] or b"0")
        except FileNotFoundError:
            return 0
        except ValueError as error:
            raise SpoolCorrupt(f"{self.offset_path}: not a byte offset ({error}); delete it to replay the whole "
                               "spool (events already in Redis are skipped by their event ids)") from error
        return offset if offset <= file_size else 0


def _write_and_sync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


@dataclass(frozen=True)
class EventOutcome:
    status: Literal["stored", "spooled"]
    duplicate: bool


class DurableEventWriter:
    """The event write path: Redis when it answers and nothing is spooled, else the spool (then a
    replay task writes the spool into Redis, in order). Without a spool (the in-process store, which
    cannot be down) it is a plain idempotent append."""

    def __init__(self, store: HistoryStore, spool: EventSpool | None, metrics: ServiceMetrics, *,
                 retry_interval_s: float = 0.1, max_retry_interval_s: float = 1.0, replay_chunk: int = 256) -> None:
        self.store = store
        self.spool = spool
        self.metrics = metrics
        self.retry_interval_s = retry_interval_s
        self.max_retry_interval_s = max_retry_interval_s
        self.replay_chunk = replay_chunk
        self._wake = asyncio.Event()
        self._replayer: asyncio.Task[None] | None = None

    @classmethod
    def for_store(cls, store: HistoryStore, spool_path: Path, spool_max_bytes: int, metrics: ServiceMetrics
                  ) -> DurableEventWriter:
        """A spool for stores that can be unreachable (Redis); none for the in-process store."""
        spool = EventSpool(spool_path, spool_max_bytes) if isinstance(store, RedisHistoryStore) else None
        return cls(store, spool, metrics)

    async def start(self) -> None:
        if self.spool is None:
            return
        await asyncio.to_thread(self.spool.open)
        self._observe()
        self._replayer = asyncio.create_task(self._replay_forever(), name="genrec-spool-replay")
        if self.spool.pending:
            self._wake.set()

    async def write(self, user_id: str, item_ids: Sequence[str], event_id: str) -> EventOutcome:
        """Raises HistoryStoreError (a server-side Redis error: not recorded), SpoolFull, OSError."""
        if self.spool is not None and self.spool.pending:  # keep order behind what is spooled
            return await self._spool(user_id, item_ids, event_id)
        try:
            appended = await self.store.append(user_id, item_ids, event_id=event_id)
        except HistoryStoreUnavailable:
            if self.spool is None:
                raise
            self.metrics.history_errors.labels(operation="write").inc()
            return await self._spool(user_id, item_ids, event_id)
        outcome = EventOutcome("stored", duplicate=not appended)
        self.metrics.event_outcomes["duplicate" if outcome.duplicate else "stored"].inc()
        return outcome

    async def _spool(self, user_id: str, item_ids: Sequence[str], event_id: str) -> EventOutcome:
        assert self.spool is not None
        try:
            appended = await self.spool.append(SpooledEvent(user_id, event_id, tuple(item_ids)))
        except SpoolFull:
            self.metrics.rejections.labels(reason="spool_full").inc()
            raise
        self._observe()
        self._wake.set()
        self.metrics.event_outcomes["spooled" if appended else "duplicate"].inc()
        return EventOutcome("spooled", duplicate=not appended)

    async def replay_once(self) -> int:
        """Write spooled events into Redis until the spool is empty; returns how many were replayed.
        Raises HistoryStoreError when Redis fails (what was replayed before stays replayed)."""
        assert self.spool is not None and isinstance(self.store, RedisHistoryStore)
        replayed = 0
        while chunk := self.spool.peek(self.replay_chunk):
            await self.store.append_many([(e.user_id, e.item_ids, e.event_id) for e in chunk])
            await self.spool.mark_replayed(len(chunk))
            replayed += len(chunk)
            self.metrics.spool_replayed.inc(len(chunk))
            self._observe()
        return replayed

    async def _replay_forever(self) -> None:
        assert self.spool is not None
        interval = self.retry_interval_s
        while True:
            await self._wake.wait()  # set when an event is spooled
            self._wake.clear()
            while self.spool.pending:
                try:
                    replayed = await self.replay_once()
                except HistoryStoreUnavailable:
                    # Redis still away: retry on a timer (new spooled events do not make it sooner).
                    await asyncio.sleep(interval)
                    interval = min(interval * 2, self.max_retry_interval_s)
                    continue
                except HistoryStoreError as error:  # a server-side error: keep the events, say so loudly
                    log.error("event spool replay failed, %d event(s) kept: %s", self.spool.pending, error)
                    await asyncio.sleep(self.max_retry_interval_s)
                    continue
                interval = self.retry_interval_s
                if replayed:
                    log.info("event spool: %d event(s) written to Redis", replayed)
                elif self.spool.pending:  # only events still being fsynced: they are durable in a moment
                    await asyncio.sleep(0.005)

    async def close(self, timeout_s: float) -> None:
        """Stop the replay task, then replay what is left within timeout_s; what Redis does not take
        stays in the spool file for the next start."""
        if self.spool is None:
            return
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None
        if self.spool.pending:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.replay_once()
            except (TimeoutError, HistoryStoreError) as error:
                log.warning("event spool: %d event(s) stay in %s for the next start (%s)", self.spool.pending,
                            self.spool.path, error or "timed out")
        self.spool.close()

    def _observe(self) -> None:
        if self.spool is not None:
            self.metrics.spool_pending.set(self.spool.pending)
            self.metrics.spool_bytes.set(self.spool.size_bytes)
