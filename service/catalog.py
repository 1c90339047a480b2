"""The living catalog: items added, updated and taken out while the service runs, without a restart.

- `CatalogView` is an immutable snapshot (item ids, titles, codes of every item index, which ones the
  beam may return, the popularity fallback without deleted items). Requests read `Catalog.current`
  once; item indices only grow (a new item takes the next one, a deleted one keeps its own), so an
  index resolved on one view means the same item on every later one.
- A change (PUT / DELETE, or one read from the store that another replica wrote) builds the next view,
  then the engine's trie and code table for it on the catalog's own thread, and swaps the engine's
  catalog before the view: a batch reads the engine's catalog once (service/engine.py), so it never
  sees half a trie, and a request never names an index its batch's code table lacks. Changes that
  arrive while a rebuild runs are folded into the next one.
- Changes persist in a `CatalogStore`: Redis (a hash of item records, a hash that claims each added
  code tuple, a version counter; every replica polls the counter and re-applies the records) or,
  without Redis, an append-only file under `catalog_state_dir` (never inside the read-only bundle).
- A new item's code tuple comes from its text (service/new_item_codes.py); the collision level gives
  it the lowest free slot on that tuple, claimed atomically in Redis so two replicas never hand out
  one slot twice. The level's capacity is the graph's; a full tuple is refused (409).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.bundle import Bundle, lookup_ids
from service.constraints import AttributeIndex, RestrictionCache
from service.new_item_codes import NewItemCoder, NoTextPath, load_new_item_coder

log = logging.getLogger(__name__)

ACTIVE, DELETED = "active", "deleted"


class CatalogError(Exception):
    """A change the catalog refuses; status and a message that says what to do."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class CatalogStoreUnavailable(Exception):
    """The store could not be read or written; the change was not made."""


class SlotTaken(Exception):
    """Another writer (a replica) claimed this code tuple first."""


@dataclass(frozen=True)
class ItemRecord:
    """One item's state as the store keeps it (the latest PUT or DELETE of that id)."""

    item_id: str
    title: str
    text: str
    attributes: dict[str, list[str]]
    codes: tuple[int, ...] | None  # the full semantic ID; None for a bundle item (keeps its trained codes)
    state: str  # ACTIVE or DELETED
    updated_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"codes": None if self.codes is None else list(self.codes)},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ItemRecord:
        data = json.loads(raw)
        codes = data.get("codes")
        return cls(item_id=str(data["item_id"]), title=str(data.get("title", "")), text=str(data.get("text", "")),
                   attributes={str(k): [str(v) for v in vs] for k, vs in (data.get("attributes") or {}).items()},
                   codes=None if codes is None else tuple(int(c) for c in codes),
                   state=DELETED if data.get("state") == DELETED else ACTIVE, updated_at=float(data.get("updated_at", 0)))


def codes_key(codes: Sequence[int]) -> str:
    return ",".join(str(int(c)) for c in codes)


@dataclass(frozen=True)
class CatalogView:
    """One immutable state of the catalog (see the module doc)."""

    version: int  # changes applied in this process
    num_trained: int  # the bundle's N: indices below it are the items the model was trained on
    item_ids: list[str]
    titles: list[str]
    semantic_ids: np.ndarray  # (M, L) int32, every index, deleted ones included (their codes stay reserved)
    live: np.ndarray  # (M,) bool: the beam may return it
    popularity: np.ndarray  # live item indices, most popular first; added items last
    index_of: dict[str, int] = field(repr=False)
    code_owner: dict[tuple[int, ...], int] = field(repr=False)  # full semantic ID -> item index
    attributes: list[dict[str, list[str]]] = field(repr=False)
    records: dict[str, ItemRecord] = field(repr=False)  # the changes applied, by item id

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_live(self) -> int:
        return int(self.live.sum())

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """(known item indices in input order, unknown ids in input order). A deleted item is still
        known: it is history (a user did buy it), only recommendations leave it out."""
        return lookup_ids(self.index_of, item_ids)

    def free_slot(self, raw: tuple[int, ...], capacity: int, skip: set[tuple[int, ...]] = frozenset()) -> tuple[int, ...] | None:
        """The lowest free collision code on a raw tuple, as a full semantic ID; None when the level is full."""
        for slot in range(capacity):
            codes = (*raw, slot)
            if codes not in self.code_owner and codes not in skip:
                return codes
        return None


def initial_view(bundle: Bundle) -> CatalogView:
    ids = bundle.semantic_ids.astype(np.int32)
    base_attributes = getattr(bundle, "attributes", None)  # items.jsonl attributes, where the bundle has them
    attributes = [dict(a) for a in base_attributes] if base_attributes else [{} for _ in range(bundle.num_items)]
    return CatalogView(
        version=0, num_trained=bundle.num_items, item_ids=list(bundle.item_ids), titles=list(bundle.titles),
        semantic_ids=ids, live=np.ones(len(ids), dtype=bool), popularity=bundle.popularity.copy(),
        index_of=dict(bundle.index_of), code_owner={tuple(row): i for i, row in enumerate(ids.tolist())},
        attributes=attributes, records={},
    )


def apply_records(view: CatalogView, changes: Sequence[ItemRecord], base_popularity: np.ndarray) -> CatalogView:
    """The next view: `changes` applied in order (oldest first). A record whose codes another item
    holds (a corrupt store) is skipped with a warning rather than breaking the trie."""
    item_ids, titles, attributes = list(view.item_ids), list(view.titles), list(view.attributes)
    index_of, code_owner, records = dict(view.index_of), dict(view.code_owner), dict(view.records)
    rows: list[tuple[int, tuple[int, ...]]] = []  # (index, codes) to write
    live_changes: dict[int, bool] = {}
    for record in changes:
        index = index_of.get(record.item_id)
        if index is None and record.codes is None:
            log.warning("catalog record %r names no bundle item and has no codes: skipped", record.item_id)
            continue
        if record.codes is not None and index is not None and index < view.num_trained:
            record = replace(record, codes=None)  # a bundle item keeps the codes it was trained with
        if record.codes is not None:
            owner = code_owner.get(record.codes)
            if owner is not None and owner != index:
                log.warning("catalog record %r: codes %s belong to %r: skipped", record.item_id, record.codes,
                            item_ids[owner])
                continue
        if index is None:
            index = len(item_ids)
            item_ids.append(record.item_id)
            titles.append(record.title)
            attributes.append({})
            index_of[record.item_id] = index
        if record.codes is not None:
            old = codes_so_far(view, rows, index)
            if old is not None and code_owner.get(old) == index:
                del code_owner[old]
            code_owner[record.codes] = index
            rows.append((index, record.codes))
        titles[index] = record.title
        attributes[index] = record.attributes
        live_changes[index] = record.state == ACTIVE
        records[record.item_id] = record
    semantic_ids = view.semantic_ids
    if len(item_ids) > len(semantic_ids) or rows:
        semantic_ids = np.zeros((len(item_ids), view.semantic_ids.shape[1]), dtype=np.int32)
        semantic_ids[: len(view.semantic_ids)] = view.semantic_ids
        for index, codes in rows:
            semantic_ids[index] = codes
    live = np.zeros(len(item_ids), dtype=bool)
    live[: len(view.live)] = view.live
    for index, is_live in live_changes.items():
        live[index] = is_live
    trained = base_popularity[live[base_popularity]]
    added = np.flatnonzero(live[view.num_trained :]) + view.num_trained
    return CatalogView(
        version=view.version + 1, num_trained=view.num_trained, item_ids=item_ids, titles=titles,
        semantic_ids=semantic_ids, live=live, popularity=np.concatenate([trained, added]).astype(np.int64),
        index_of=index_of, code_owner=code_owner, attributes=attributes, records=records,
    )


def restrictions_over(view: CatalogView) -> RestrictionCache:
    """Per-request constraints (service/constraints.py) over a view: its codes, attributes and live
    items, added ones included."""
    attributes = AttributeIndex.from_rows(view.attributes, view.num_items)
    return RestrictionCache(view.semantic_ids, attributes, view.popularity, view.live)


def codes_so_far(view: CatalogView, rows: list[tuple[int, tuple[int, ...]]], index: int) -> tuple[int, ...] | None:
    """The codes index holds so far in this application (pending rows first, then the view)."""
    for row_index, codes in reversed(rows):
        if row_index == index:
            return codes
    if index < len(view.semantic_ids):
        return tuple(int(c) for c in view.semantic_ids[index])
    return None


# --- stores ---------------------------------------------------------------------------------------


class CatalogStore(Protocol):
    backend: str
    shared: bool  # other replicas write to it: poll it

    async def load(self) -> dict[str, ItemRecord]: ...

    async def version(self) -> int: ...

    async def write(self, record: ItemRecord, claim: tuple[int, ...] | None, release: tuple[int, ...] | None) -> None:
        """Persist the record; claim (an added item's new codes) fails with SlotTaken when another
        item holds them; release frees the item's previous codes."""
        ...

    async def close(self) -> None: ...


class FileCatalogStore:
    """Append-only JSON lines, fsynced before a change is acknowledged; the last line of an item wins.
    One process per file (replicas share state through Redis)."""

    backend = "file"
    shared = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._version = 0

    async def load(self) -> dict[str, ItemRecord]:
        return await asyncio.to_thread(self._load)

    def _load(self) -> dict[str, ItemRecord]:
        records: dict[str, ItemRecord] = {}
        if not self.path.is_file():
            return records
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = ItemRecord.from_json(line)
                except (ValueError, KeyError, TypeError) as e:  # a torn last line after a crash
                    log.warning("%s:%d: unreadable catalog record skipped (%s)", self.path, line_no, e)
                    continue
                records[record.item_id] = record
                self._version += 1
        return records

    async def version(self) -> int:
        return self._version

    async def write(self, record: ItemRecord, claim: tuple[int, ...] | None, release: tuple[int, ...] | None) -> None:
        try:
            await asyncio.to_thread(self._append, record.to_json() + "\n")
        except OSError as e:
            raise CatalogStoreUnavailable(f"catalog state file {self.path} cannot be written ({e.strerror})") from e
        self._version += 1

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    async def close(self) -> None:
        return None


# Claims the new codes (unless another item holds them), frees the item's old ones, stores the record and
# bumps the version, all at once. KEYS: records, code claims, version. ARGV: item id, record, claim, release.
_WRITE_SCRIPT = """
if ARGV[3] ~= '' then
  local owner = redis.call('HGET', KEYS[2], ARGV[3])
  if owner and owner ~= ARGV[1] then return -1 end
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
end
if ARGV[4] ~= '' and ARGV[4] ~= ARGV[3] and redis.call('HGET', KEYS[2], ARGV[4]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], ARGV[4])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCR', KEYS[3])
"""


class RedisCatalogStore:
    """`genrec:catalog:{<bundle>/<version>}:items` (hash: item id -> record), `...:codes` (hash: added
    code tuple -> item id), `...:version` (counter). The braces keep the three on one cluster slot.
    Codes belong to one bundle version, so each version has its own keys."""

    backend = "redis"
    shared = True

    def __init__(self, client: Any, bundle_key: str) -> None:
        self._client = client
        prefix = f"genrec:catalog:{{{bundle_key}}}"
        self.keys = (f"{prefix}:items", f"{prefix}:codes", f"{prefix}:version")

    @classmethod
    def from_url(cls, url: str, bundle_key: str, cluster: bool = False, timeout_s: float = 2.0) -> RedisCatalogStore:
        import redis.asyncio as aioredis

        options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        client = aioredis.RedisCluster.from_url(url, **options) if cluster else aioredis.from_url(url, **options)
        return cls(client, bundle_key)

    async def _call(self, coro: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await coro
        except (RedisError, OSError, TimeoutError) as e:
            raise CatalogStoreUnavailable(f"catalog store (redis) unavailable: {type(e).__name__}: {e}") from e

    async def load(self) -> dict[str, ItemRecord]:
        raw = await self._call(self._client.hgetall(self.keys[0]))
        records = {}
        for item_id, value in raw.items():
            try:
                record = ItemRecord.from_json(value)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("catalog record %r in redis is unreadable, skipped (%s)", item_id, e)
                continue
            records[record.item_id] = record
        return records

    async def version(self) -> int:
        return int(await self._call(self._client.get(self.keys[2])) or 0)

    async def write(self, record: ItemRecord, claim: tuple[int, ...] | None, release: tuple[int, ...] | None) -> None:
        result = await self._call(self._client.eval(
            _WRITE_SCRIPT, 3, *self.keys, record.item_id, record.to_json(),
            codes_key(claim) if claim else "", codes_key(release) if release else ""))
        if int(result) < 0:
            raise SlotTaken(codes_key(claim or ()))

    async def close(self) -> None:
        await self._client.aclose()


# --- the catalog ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemInfo:
    """What GET /items/{id} shows."""

    item_id: str
    title: str
    codes: list[int]
    state: str
    source: str  # "bundle": trained on; "added": added through the API
    attributes: dict[str, list[str]]
    text: str | None
    updated_at: float | None
    catalog_version: int


class Catalog:
    """Owns the current view, applies changes, keeps the engine's trie in step (module doc)."""

    def __init__(self, bundle: Bundle, engine: Any, store: CatalogStore, poll_s: float = 1.0) -> None:
        self.bundle = bundle
        self.engine = engine
        self.store = store
        self.poll_s = poll_s
        self.capacity = int(bundle.manifest.model.get("config", {}).get("codebook_sizes", [0])[-1] or 0)
        self._current = self._latest = initial_view(bundle)
        self._restrictions = restrictions_over(self._current)
        self._write_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="catalog")
        self._poll_task: asyncio.Task[None] | None = None
        self._seen_store_version = -1
        self.coder: NewItemCoder | None = None
        self.refusal = ""  # why this service cannot add items ("" when it can)
        if not hasattr(engine, "prepare_catalog"):
            self.refusal = "catalog changes need the onnx engine (GENREC_ENGINE=onnx)"
        elif getattr(engine, "new_items_refused", ""):
            self.refusal = engine.new_items_refused
        if not self.capacity:
            self.refusal = self.refusal or "the manifest does not give the collision level's size (model.config.codebook_sizes)"

    @property
    def current(self) -> CatalogView:
        return self._current

    def restrictions(self) -> RestrictionCache:
        """Per-request constraints over the current view; built with it, off the request path."""
        return self._restrictions

    async def start(self) -> None:
        """Load the text path, re-apply the stored changes, start polling a shared store."""
        if not self.refusal:
            try:
                self.coder = await asyncio.get_running_loop().run_in_executor(self._executor, load_new_item_coder, self.bundle)
            except NoTextPath as e:
                self.refusal = str(e)
            except Exception as e:  # a broken text path costs adding items, not serving
                log.exception("the bundle's text path for new items cannot be loaded")
                self.refusal = f"the bundle's text path for new items cannot be loaded ({e})"
        try:
            await self.sync()
        except CatalogStoreUnavailable as e:  # serve the bundle's catalog; the poll catches up
            log.warning("catalog changes not loaded yet: %s", e)
        if self.store.shared:
            self._poll_task = asyncio.create_task(self._poll(), name="catalog-poll")

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            try:
                await self._poll_task
            except asyncio.CancelledError:
                pass
        await self.store.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def sync(self) -> bool:
        """Apply the store's records that differ from what this process has; True if any did."""
        version = await self.store.version()
        if version == self._seen_store_version:
            return False
        records = await self.store.load()
        async with self._write_lock:
            changed = [r for r in records.values() if self._latest.records.get(r.item_id) != r]
            changed.sort(key=lambda r: r.updated_at)
            if changed:
                self._latest = apply_records(self._latest, changed, self.bundle.popularity)
        self._seen_store_version = version
        if changed:
            await self._publish(self._latest)
        return bool(changed)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except CatalogStoreUnavailable as e:
                log.warning("catalog poll: %s", e)
            except Exception:  # keep polling whatever one round hit
                log.exception("catalog poll failed")

    def info(self, item_id: str) -> ItemInfo:
        view = self._current
        index = view.index_of.get(item_id)
        if index is None:
            raise CatalogError(404, f"item {item_id!r} is not in the catalog; add it with PUT /items/{{item_id}}")
        record = view.records.get(item_id)
        return ItemInfo(
            item_id=item_id, title=view.titles[index], codes=[int(c) for c in view.semantic_ids[index]],
            state=ACTIVE if view.live[index] else DELETED, source="bundle" if index < view.num_trained else "added",
            attributes=view.attributes[index], text=record.text if record else None,
            updated_at=record.updated_at if record else None, catalog_version=view.version)

    async def put(self, item_id: str, title: str, text: str, attributes: dict[str, list[str]]) -> tuple[ItemInfo, bool]:
        """Add or update an item; returns (its info once recommendable, whether it was created)."""
        async with self._write_lock:
            view = self._latest
            index = view.index_of.get(item_id)
            record = ItemRecord(item_id, title, text, attributes, None, ACTIVE, time.time())
            if index is not None and index < view.num_trained:  # a bundle item keeps the codes it was trained with
                await self.store.write(record, None, None)
            else:
                if self.refusal:
                    raise CatalogError(409, f"cannot add items: {self.refusal}")
                loop = asyncio.get_running_loop()
                candidates = (await loop.run_in_executor(self._executor, self.coder.candidates, [text]))[0]
                held = None if index is None else tuple(int(c) for c in view.semantic_ids[index])
                if held is not None and held[:-1] == tuple(candidates[0]):  # same text codes: keep the slot
                    record = replace(record, codes=held)
                    await self.store.write(record, None, None)
                else:
                    record = await self._claim_codes(view, record, candidates, held)
            self._latest = apply_records(self._latest, [record], self.bundle.popularity)
            target = self._latest
        await self._publish(target)
        return self.info(item_id), index is None

    async def _claim_codes(self, view: CatalogView, record: ItemRecord, candidates: list[tuple[int, ...]],
                           held: tuple[int, ...] | None) -> ItemRecord:
        """The record with the first free slot on the first candidate tuple that has one, claimed in the
        store with the record (one atomic write; `held`, the item's old codes, released); 409 when
        every candidate's collision level is full."""
        taken_elsewhere: set[tuple[int, ...]] = set()
        for raw in candidates:
            while (codes := view.free_slot(tuple(raw), self.capacity, taken_elsewhere)) is not None:
                claimed = replace(record, codes=codes)
                try:
                    await self.store.write(claimed, codes, held)
                except SlotTaken:  # a replica added an item there first: the poll will bring it
                    taken_elsewhere.add(codes)
                    continue
                return claimed
        tried = " or ".join(str(list(c)) for c in candidates[:3])
        raise CatalogError(409, f"the collision level of code tuple {tried} is full ({self.capacity} items, the size "
                                "the model was exported with): this item cannot get a unique code; delete an item "
                                "there or retrain with a larger collision_capacity")

    async def delete(self, item_id: str) -> ItemInfo:
        async with self._write_lock:
            view = self._latest
            index = view.index_of.get(item_id)
            if index is None:
                raise CatalogError(404, f"item {item_id!r} is not in the catalog")
            if view.live[index]:
                if view.num_live <= 1:
                    raise CatalogError(409, "this is the catalog's last recommendable item; add another first")
                previous = view.records.get(item_id)
                record = ItemRecord(item_id, view.titles[index], previous.text if previous else "",
                                    view.attributes[index], None if index < view.num_trained
                                    else tuple(int(c) for c in view.semantic_ids[index]), DELETED, time.time())
                await self.store.write(record, None, None)  # its codes stay claimed: a re-PUT gets them back
                self._latest = apply_records(self._latest, [record], self.bundle.popularity)
            target = self._latest
        await self._publish(target)
        return self.info(item_id)

    async def _publish(self, view: CatalogView) -> None:
        """Build the engine's catalog for `view` (or a later one) off the event loop, swap it, then the
        view. Callers that queue behind a rebuild find their change already published."""
        async with self._publish_lock:
            latest = self._latest
            if latest.version <= self._current.version:
                return
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self._executor, self.engine.prepare_catalog,
                                                  latest.semantic_ids, latest.live, latest.version)
            restrictions = await loop.run_in_executor(self._executor, restrictions_over, latest)
            self.engine.swap_catalog(prepared)  # the engine first: a request resolving new ids finds their codes
            self._current, self._restrictions = latest, restrictions


def build_catalog_store(settings: Any, bundle: Bundle) -> CatalogStore:
    """Redis when the service has one (shared by every replica), else a file under catalog_state_dir."""
    bundle_key = f"{bundle.name}/{bundle.version}"
    if settings.redis_url:
        return RedisCatalogStore.from_url(settings.redis_url, bundle_key, cluster=settings.redis_cluster)
    return FileCatalogStore(Path(settings.catalog_state_dir) / "catalog" / bundle.name / f"{bundle.version}.jsonl")
