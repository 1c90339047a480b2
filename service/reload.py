"""Model reload without a restart (`POST /admin/reload`): load a new bundle beside the serving one,
verify it, warm it up, then swap the app's `Serving` as a whole.

Order: load_bundle (schema, sha256 of every listed file, arrays) -> engine (graph inputs against the
contract) -> warm-up batch -> the new version's catalog changes re-applied (its own `Catalog`: changes
belong to one bundle version, service/catalog.py) -> a new batcher started -> swap. Any failure before the swap refuses the bundle with its reason and
leaves the old one serving. After the swap new requests take the new Serving; requests that already
hold the old one (reading their history) still submit to the old batcher, so it keeps running until
no such request can be left (a request's deadline, request_timeout_ms) and then drains: batches in
flight finish on the old engine, and every answer names the bundle that computed it.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from service.batcher import MicroBatcher, lower_thread_priority
from service.bundle import Bundle, BundleError
from service.config import find_newest_bundle
from service.catalog import Catalog
from service.deps import AppState, Serving
from service.engine import BeamEngine

log = logging.getLogger(__name__)

# A retired batcher stays open this much beyond a request's deadline for requests that hold it.
RETIRE_MARGIN_S = 0.5


@dataclass(frozen=True)
class OpenedBundle:
    """A verified, warmed-up bundle with its engine and started batcher (service/app.py open_bundle)."""

    bundle: Bundle
    engine: BeamEngine
    batcher: MicroBatcher
    max_history: int
    catalog: Catalog  # the version's items with its catalog changes re-applied


class ReloadRefused(Exception):
    """The reload did not happen; the old bundle keeps serving. status: the HTTP answer."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class ReloadOutcome:
    previous: Bundle
    current: Bundle
    seconds: float
    warnings: list[str]


RunBlocking = Callable[..., Awaitable[Any]]
OpenBundle = Callable[[Path, RunBlocking], Awaitable[OpenedBundle]]

# Nice value added to the thread that loads, builds and warms up a new bundle. At the event loop's
# priority that work (~0.5 s of a core) took a core from the serving engine threads (GENREC_ENGINE_NICE)
# and on 2 cores at 50% of peak the p99 rose from ~0.2 s to 0.7-0.9 s during reloads; at the engine's own
# nice still 0.8 s; at 19 it stayed at the no-reload p99 (make bench-constraints, one run each).
RELOAD_NICE = 19


def _thread_ids() -> set[int]:
    """This process's thread ids (Linux; empty elsewhere)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _restore_priority(new_threads: set[int], inherited_nice: int) -> None:
    """Threads created during a reload that inherited the reload thread's nice value (onnxruntime's
    intra-op pools; not the engine workers, which set their own) back to the event loop's nice value."""
    if sys.platform != "linux" or not new_threads:
        return
    target = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    lowered = min(target + inherited_nice, 19)  # the kernel caps nice values at 19
    refused = 0
    for tid in new_threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) == lowered:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except PermissionError:
            refused += 1
        except OSError:  # the thread is gone (the reload thread itself)
            pass
    if refused:
        log.warning("%d onnxruntime thread(s) of the reloaded engine stay at nice %d: raising them back needs root "
                    "or CAP_SYS_NICE; a restart gives them the event loop's priority", refused, lowered)


class Reloader:
    """One reload at a time; a second one while the first runs gets 409."""

    def __init__(self, state: AppState, open_bundle: OpenBundle, on_swap: Callable[[], None] | None = None) -> None:
        self.state = state
        self.open_bundle = open_bundle
        self.on_swap = on_swap
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._drain_now = asyncio.Event()  # shutdown: retired batchers drain without waiting out the deadline
        self._closing = False

    def resolve(self, bundle_dir: str | None) -> Path:
        """The bundle to load: the given folder (relative paths under GENREC_MODELS_ROOT), else the
        newest bundle under GENREC_MODELS_ROOT."""
        models_root = self.state.settings.models_root
        if bundle_dir is None:
            try:
                return find_newest_bundle(models_root)
            except FileNotFoundError as error:
                raise ReloadRefused(404, str(error)) from None
        path = Path(bundle_dir)
        path = path if path.is_absolute() else models_root / path
        if not (path / "manifest.json").is_file():
            raise ReloadRefused(404, f"no bundle at {path} (expected a models/<name>/<version> folder with manifest.json; "
                                     f"relative paths are taken under GENREC_MODELS_ROOT={models_root})")
        return path

    async def reload(self, bundle_dir: str | None) -> ReloadOutcome:
        if self._lock.locked():
            raise ReloadRefused(409, "another reload is in progress; retry when it has finished")
        async with self._lock:
            previous = self.state.serving
            if previous is None or not self.state.accepting or self._closing:
                raise ReloadRefused(503, "the service is starting or shutting down; nothing to reload")
            path = self.resolve(bundle_dir)
            serving_now = f"{previous.bundle.name}/{previous.bundle.version}"
            started = time.perf_counter()
            try:
                opened = await self._open_below_serving(path)
            except BundleError as error:
                raise ReloadRefused(409, f"bundle {path} refused: {error}; still serving {serving_now}") from None
            except Exception as error:  # a graph that fails its warm-up batch, a session that cannot be built
                log.exception("reload of %s failed", path)
                raise ReloadRefused(409, f"bundle {path} refused: {type(error).__name__}: {error}; "
                                         f"still serving {serving_now}") from None
            new = replace(previous, bundle=opened.bundle, engine=opened.engine, batcher=opened.batcher,
                          max_history=opened.max_history, catalog=opened.catalog)
            if self._closing or not self.state.accepting:  # shutdown began while loading: serve nothing new
                await opened.batcher.close(0)
                await opened.catalog.close()
                raise ReloadRefused(503, "the service is shutting down; the reload was abandoned")
            self.state.serving = new  # the swap: one assignment, seen by every request that starts after it
            previous.metrics.set_model(new.bundle.name, new.bundle.version)
            if self.on_swap is not None:
                self.on_swap()
            gc.freeze()  # the new bundle's tables, as at startup
            self._retire(previous)
            warnings = []
            stored = getattr(new.store, "max_items", new.max_history)  # the store's bound, set at startup
            if new.max_history > stored:
                warnings.append(f"the new bundle reads {new.max_history} history items but the history store keeps "
                                f"{stored} per user (set at startup); restart to store more")
            log.info("reloaded: %s -> %s/%s in %.1f s", serving_now, new.bundle.name, new.bundle.version,
                     time.perf_counter() - started)
            return ReloadOutcome(previous.bundle, new.bundle, time.perf_counter() - started, warnings)

    async def _open_below_serving(self, path: Path) -> OpenedBundle:
        """open_bundle with its blocking steps (hashing; session creation, ~0.5 s of a core for a 4 + 4
        layer model; warm-up) in a thread at RELOAD_NICE, below the serving engine threads.

        onnxruntime's intra-op threads inherit their creator's nice value, so those of the new sessions
        are set back afterwards to what startup gives them (the event loop's); that needs the privilege to
        raise a priority (root or CAP_SYS_NICE), without which they stay at RELOAD_NICE (logged)."""
        loop = asyncio.get_running_loop()
        before = _thread_ids()
        with ThreadPoolExecutor(1, thread_name_prefix="genrec-reload",
                                initializer=partial(lower_thread_priority, RELOAD_NICE)) as executor:

            async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
                return await loop.run_in_executor(executor, partial(fn, *args))

            try:
                return await self.open_bundle(path, run_blocking)
            finally:
                _restore_priority(_thread_ids() - before, RELOAD_NICE)

    def _retire(self, old: Serving) -> None:
        task = asyncio.create_task(self._drain_later(old), name="genrec-retire-batcher")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain_later(self, old: Serving) -> None:
        settings = self.state.settings
        # Requests that took the old Serving submit within their deadline, or give up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_now.wait(), settings.request_timeout_ms / 1000.0 + RETIRE_MARGIN_S)
        await old.batcher.close(settings.drain_timeout_s)
        await old.catalog.close()  # its replica poll stops; the new version's catalog serves
        log.info("retired %s/%s: its batcher drained", old.bundle.name, old.bundle.version)

    async def close(self, timeout_s: float) -> None:
        """Shutdown: wait out a reload in progress, then drain the retired batchers at once."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async with self._lock:
                    pass
        self._drain_now.set()
        await asyncio.gather(*self._retiring, return_exceptions=True)
