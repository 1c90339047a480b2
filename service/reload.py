"""Model reload without a restart (`POST /admin/reload`): load a new bundle beside the serving one,
verify it, warm it up, then swap the app's `Serving` as a whole.

Order: load_bundle (schema, sha256 of every listed file, arrays) -> engine (graph inputs against the
contract) -> warm-up batch -> a new batcher started -> catalog changes re-applied
(`reapply_catalog_changes`) -> swap. Any failure before the swap refuses the bundle with its reason and
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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from service.batcher import MicroBatcher
from service.bundle import Bundle, BundleError
from service.config import find_newest_bundle
from service.constraints import RestrictionCache
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
    restrictions: RestrictionCache


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


async def reapply_catalog_changes(previous: Serving, new: Serving) -> Serving:
    """HOOK for the catalog API (issue 31, part 2): re-apply the live item table (items added, updated
    or deleted through PUT/DELETE /items since the bundle was exported) onto the freshly loaded bundle
    before it serves: codes for added items, the trie patched, `restrictions` rebuilt over it. Runs
    before the swap, so a failure here refuses the reload and the old bundle keeps serving. Until the
    catalog API exists there is nothing to re-apply."""
    return new


OpenBundle = Callable[[Path], Awaitable[OpenedBundle]]


class Reloader:
    """One reload at a time; a second one while the first runs gets 409."""

    def __init__(self, state: AppState, open_bundle: OpenBundle, on_swap: Callable[[], None] | None = None) -> None:
        self.state = state
        self.open_bundle = open_bundle
        self.on_swap = on_swap
        self.reapply_catalog = reapply_catalog_changes
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
                opened = await self.open_bundle(path)
            except BundleError as error:
                raise ReloadRefused(409, f"bundle {path} refused: {error}; still serving {serving_now}") from None
            except Exception as error:  # a graph that fails its warm-up batch, a session that cannot be built
                log.exception("reload of %s failed", path)
                raise ReloadRefused(409, f"bundle {path} refused: {type(error).__name__}: {error}; "
                                         f"still serving {serving_now}") from None
            new = replace(previous, bundle=opened.bundle, engine=opened.engine, batcher=opened.batcher,
                          max_history=opened.max_history, restrictions=opened.restrictions)
            try:
                new = await self.reapply_catalog(previous, new)
            except Exception as error:
                await opened.batcher.close(0)
                raise ReloadRefused(409, f"bundle {path} refused: re-applying the catalog changes failed "
                                         f"({type(error).__name__}: {error}); still serving {serving_now}") from None
            if self._closing or not self.state.accepting:  # shutdown began while loading: serve nothing new
                await opened.batcher.close(0)
                raise ReloadRefused(503, "the service is shutting down; the reload was abandoned")
            self.state.serving = new  # the swap: one assignment, seen by every request that starts after it
            previous.metrics.set_model(new.bundle.name, new.bundle.version)
            if self.on_swap is not None:
                self.on_swap()
            gc.freeze()  # the new bundle's tables, as at startup
            self._retire(previous)
            warnings = []
            if new.max_history > previous.max_history:
                warnings.append(f"the new bundle reads {new.max_history} history items but the history store keeps "
                                f"{previous.max_history} per user (set at startup); restart to store more")
            log.info("reloaded: %s -> %s/%s in %.1f s", serving_now, new.bundle.name, new.bundle.version,
                     time.perf_counter() - started)
            return ReloadOutcome(previous.bundle, new.bundle, time.perf_counter() - started, warnings)

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
