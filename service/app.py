"""The FastAPI app: wiring, lifespan (load -> trie -> warm-up -> ready; drain on shutdown), errors."""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import AdmissionController
from service.batcher import BatcherClosed, DeadlineExceeded, MicroBatcher, OverCapacity
from service.bundle import Bundle, load_bundle
from service.catalog import Catalog, build_catalog_store
from service.admin import AdminToken
from service.clients import (API_KEY_HEADER, ApiKeys, ClientGateMiddleware, RequestBodyMiddleware, TokenBuckets,
                             error_body, is_guarded_path, replaying)
from service.config import Settings, engine_threads
from service.deps import ApiError, AppState, Serving
from service.engine import BeamEngine, OnnxBeamEngine
from service.history import CoalescingHistoryReader, HistoryStore, InMemoryHistoryStore, RedisHistoryStore
from service.metrics import ServiceMetrics
from service.reference import ReferenceBeamEngine
from service.routes import ROUTERS
from service.reload import OpenedBundle, Reloader
from service.spool import DurableEventWriter

log = logging.getLogger("service")
ENDPOINT_SCOPE_KEY = "genrec.endpoint"  # set by a middleware that answers before routing
CLOSE_TIMEOUT_S = 5.0  # per client closed at shutdown, after the drain


def create_app(settings: Settings | None = None, *, history_store: HistoryStore | None = None) -> FastAPI:
    """history_store: inject a store (tests); by default Redis when redis_url is set, else in-process."""
    settings = settings if settings is not None else Settings()
    metrics = ServiceMetrics()
    state = AppState(settings=settings, metrics=metrics)
    api_keys = ApiKeys.from_settings(settings.api_keys, settings.api_keys_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not api_keys.enabled:
            log.warning("no API keys configured (GENREC_API_KEYS, GENREC_API_KEYS_FILE): /recommend and "
                        "/users/{id}/events are open to anyone who can reach this port")
        serving = await start_serving(settings, metrics, history_store, state)
        state.serving = serving
        state.accepting = True
        state.ready = not state.draining  # a stop signal during startup keeps it out of rotation
        log.info("serving %s/%s with %s engine on %s", serving.bundle.name, serving.bundle.version,
                 serving.engine_kind, serving.engine.provider)
        try:
            yield
        finally:
            state.start_draining()
            state.accepting = False
            await reloader.close(settings.drain_timeout_s)  # a reload in progress, retired batchers
            serving = state.serving or serving  # a reload may have swapped it
            await serving.batcher.close(settings.drain_timeout_s)
            await serving.events.close(settings.drain_timeout_s)  # flush the spool into Redis if it is back
            # Closing clients must not hold the process past its drain: each gets a bound.
            for name, closing in (("history store", serving.store.close()), ("catalog", serving.catalog.close())):
                try:
                    await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
                except Exception as e:  # a timeout included: shutting down either way
                    log.warning("closing the %s did not finish cleanly (%s); shutting down anyway", name, type(e).__name__)

    app = FastAPI(
        title="genrec",
        summary="Generative-retrieval recommendations: constrained beam search over semantic IDs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.genrec = state
    app.state.admin_token = AdminToken(settings.admin_token)
    # After a reload the OpenAPI examples are rebuilt from the new bundle's item ids.
    reloader = Reloader(state, lambda bundle_dir, run_blocking: open_bundle(settings, metrics, bundle_dir,
                                                                            run_blocking=run_blocking),
                        on_swap=lambda: setattr(app, "openapi_schema", None))
    app.state.reloader = reloader
    for router in ROUTERS:
        app.include_router(router)
    _add_error_handlers(app)
    app.openapi = lambda: _openapi(app, state)  # type: ignore[method-assign]
    # Added innermost first: metrics see every answer, CORS answers preflights before the key check,
    # the client gate refuses before a body is read, admission before the app parses and validates it.
    app.add_middleware(AdmissionGateMiddleware, state=state)
    app.add_middleware(RequestBodyMiddleware, max_body_bytes=settings.max_body_bytes,
                       read_timeout_s=settings.request_read_timeout_s, metrics=metrics)
    app.add_middleware(ClientGateMiddleware, api_keys=api_keys,
                       buckets=TokenBuckets(settings.client_rate_per_s, settings.client_burst), metrics=metrics)
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", API_KEY_HEADER, "Idempotency-Key"], max_age=600)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # added last = outermost
    return app


async def start_serving(
    settings: Settings, metrics: ServiceMetrics, history_store: HistoryStore | None, state: AppState
) -> Serving:
    # An engine thread needs the GIL to start a batch and to hand back its result; a busy event loop
    # gives it up only every switch interval (Python's default 5 ms, longer than a small batch's run).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
    opened = await open_bundle(settings, metrics, settings.resolved_bundle_dir(), state)
    store = history_store if history_store is not None else build_store(settings, opened.max_history)
    if not await store.ping():  # a store outage degrades answers, it does not block readiness
        log.warning("history store (%s) is not reachable; serving degraded until it is", store.backend)
    events = DurableEventWriter.for_store(store, settings.event_spool_path, settings.event_spool_max_bytes, metrics)
    await events.start()
    metrics.set_model(opened.bundle.name, opened.bundle.version)
    # The bundle's item tables are long-lived: moving them out of the collector's generations keeps
    # full collections (pauses in the request path) short.
    gc.freeze()
    return Serving(
        settings=settings,
        bundle=opened.bundle,
        engine=opened.engine,
        engine_kind=settings.engine,
        batcher=opened.batcher,
        store=store,
        history_reader=CoalescingHistoryReader(store),
        events=events,
        metrics=metrics,
        max_history=opened.max_history,
        catalog=opened.catalog,
    )


async def open_bundle(settings: Settings, metrics: ServiceMetrics, bundle_dir: Path, state: AppState | None = None,
                      run_blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> OpenedBundle:
    """Load and verify a bundle (checksums), build its engine, run the warm-up batch and start its
    batcher: what serving one bundle needs, at startup and for a reload (service/reload.py, which runs
    the blocking steps below the serving threads' priority)."""
    # Blocking steps (hashing, session creation, warm-up) run in threads so /health/live stays answerable.
    bundle = await run_blocking(load_bundle, bundle_dir)
    max_history = min(settings.max_history or bundle.max_history, bundle.max_history)
    if state is not None:
        state.not_ready_reason = "starting: building the engine and the trie"
    engine = await run_blocking(build_engine, settings, bundle, max_history)
    if state is not None:
        state.not_ready_reason = "starting: warm-up batch"
    await run_blocking(warm_up, engine, bundle, max_history, settings.max_batch_size)

    # Catalog changes made to this bundle version earlier (this process's state file, or every replica's
    # in Redis) re-applied; at a reload too, before the swap.
    if state is not None:
        state.not_ready_reason = "starting: re-applying catalog changes"
    catalog = Catalog(bundle, engine, build_catalog_store(settings, bundle), poll_s=settings.catalog_poll_s)
    await catalog.start()
    admission = AdmissionController(settings.latency_budget_ms / 1000.0, settings.max_batch_size,
                                    settings.engine_workers, max_wait_s=settings.max_wait_ms / 1000.0,
                                    adapt_batch_size=settings.adaptive_batch_size)
    batcher = MicroBatcher(
        engine,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue_size=settings.max_queue_size,
        engine_workers=settings.engine_workers,
        engine_nice=settings.engine_nice,
        pin_engine_threads=settings.pin_engine_threads,
        close_when_none_coming=settings.close_when_none_coming,
        admission=admission,
        metrics=metrics,
    )
    await batcher.start()
    return OpenedBundle(bundle, engine, batcher, max_history, catalog)


def build_engine(settings: Settings, bundle: Bundle, max_history: int) -> BeamEngine:
    threads = engine_threads(settings.intra_op_threads, os.cpu_count() or 1)
    if settings.engine == "reference":
        return ReferenceBeamEngine(bundle, providers=settings.onnx_providers, intra_op_threads=threads, max_history=max_history)
    # One worker never overlaps its own batches: a second session would only hold memory.
    busy_threads = settings.busy_intra_op_threads if settings.engine_workers > 1 else None
    return OnnxBeamEngine(bundle, providers=settings.onnx_providers, intra_op_threads=threads, max_history=max_history,
                          busy_intra_op_threads=busy_threads)


def build_store(settings: Settings, max_history: int) -> HistoryStore:
    if settings.redis_url:
        return RedisHistoryStore.from_url(
            settings.redis_url, max_items=max_history, ttl_s=settings.history_ttl_s, timeout_ms=settings.redis_timeout_ms,
            cluster=settings.redis_cluster,
            idempotency_window=settings.idempotency_window,
        )
    return InMemoryHistoryStore(max_items=max_history, ttl_s=settings.history_ttl_s,
                                idempotency_window=settings.idempotency_window)


def warm_up(engine: BeamEngine, bundle: Bundle, max_history: int, max_batch_size: int) -> None:
    """Run a single-request and a full batch once, so the first real requests do not pay for
    lazy allocations and kernel selection."""
    seed = bundle.popularity[:max_history] if len(bundle.popularity) else np.arange(min(max_history, bundle.num_items))
    history = np.asarray(seed, dtype=np.int64)
    for batch_size in sorted({1, max_batch_size}):
        engine.search([history] * batch_size)


# --- errors -------------------------------------------------------------------------------------

_JSON_TYPE_NAMES = {"bool": "boolean", "float": "number", "NoneType": "null", "list": "array", "dict": "object",
                    "str": "string", "int": "integer"}
_EXAMPLE_BODY = '{"user_id": "u1", "history": ["item-1", "item-2"], "k": 10}'


def describe_validation_errors(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    """One readable sentence plus one entry per field, each saying where and what to change."""
    entries: list[dict[str, Any]] = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        where = ".".join(loc)
        kind = error.get("type", "")
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            position = loc[1] if len(loc) > 1 else "?"
            message = f"malformed JSON at character {position}: {reason}; send a JSON object such as {_EXAMPLE_BODY}"
            where = "body"
        elif loc == ["body"] and kind in ("model_attributes_type", "dict_type", "missing"):
            message = f"expected a JSON object with header Content-Type: application/json, such as {_EXAMPLE_BODY}"
        elif kind == "extra_forbidden":
            message = f"unknown field {loc[-1]!r}; remove it (see the OpenAPI schema at /docs for the fields)"
        elif kind == "value_error":  # our validators' messages say what to change already
            message = str((error.get("ctx") or {}).get("error", error.get("msg", "invalid value")))
        else:
            message = str(error.get("msg", "invalid value"))
            if "input" in error and kind.endswith("_type"):
                message += f" (got {_JSON_TYPE_NAMES.get(type(error['input']).__name__, type(error['input']).__name__)})"
        entries.append({"loc": where, "message": message, "type": kind})
    summary = "; ".join(f"{e['loc']}: {e['message']}" for e in entries[:5])
    if len(entries) > 5:
        summary += f"; and {len(entries) - 5} more"
    return f"Invalid request: {summary}", entries


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, entries = describe_validation_errors(exc)
        # Not JSON at all is a malformed request (400); JSON with wrong values is unprocessable (422).
        status = 400 if any(e["type"] == "json_invalid" for e in entries) else 422
        return JSONResponse(error_body(detail, entries), status_code=status)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.detail, exc.errors), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(OverCapacity)
    async def on_over_capacity(request: Request, exc: OverCapacity) -> JSONResponse:
        return _over_capacity_response(exc)

    @app.exception_handler(DeadlineExceeded)
    async def on_deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        budget = app.state.genrec.settings.request_timeout_ms
        return JSONResponse(
            error_body(f"request deadline of {budget:g} ms passed ({exc}); the service is overloaded, retry later"),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(BatcherClosed)
    async def on_closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


# --- OpenAPI --------------------------------------------------------------------------------------

def _openapi(app: FastAPI, state: AppState) -> dict[str, Any]:
    """FastAPI's schema, plus the API key scheme on the guarded routes and, once a bundle is served,
    examples made of its item ids (so every example the spec shows is accepted as it stands)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schema.setdefault("components", {})["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER,
                   "description": "Needed when the service has API keys configured (GENREC_API_KEYS); "
                                  "health, /info and /metrics are always open."},
    }
    for path, operations in schema.get("paths", {}).items():
        if is_guarded_path(path.replace("{user_id}", "user")):
            for operation in operations.values():
                operation["security"] = [{"ApiKey": []}, {}]  # {}: open when no keys are configured
    if state.serving is None:
        return schema  # not cached: the bundle's examples come once it is loaded
    bundle = state.serving.bundle
    known = [bundle.item_ids[int(i)] for i in bundle.popularity[:3]]
    schemas = schema["components"]["schemas"]
    schemas["EventsRequest"]["examples"] = [{"item_ids": known[:2], "event_id": "3f6c1a9e-click-0001"}]
    examples: list[dict[str, Any]] = [{"user_id": "A1B2C3", "k": 10}, {"history": known, "k": 5, "exclude_history": True}]
    attributes = bundle.attributes[int(bundle.popularity[0])] if bundle.attributes else {}
    if attributes:  # a filter on the most popular item's first attribute, so the example matches items
        name = sorted(attributes)[0]
        examples.append({"history": known[:2], "k": 5, "filters": {name: attributes[name][0]}, "exclude": known[2:]})
    schemas["RecommendRequest"]["examples"] = examples
    app.openapi_schema = schema
    return schema


# --- middleware ---------------------------------------------------------------------------------

class AdmissionGateMiddleware:
    """Refuses a /recommend headed for the engine (a history or a user id) with 429 when admission
    says it would miss the latency budget, before FastAPI routes, parses and validates it: under
    overload most requests are refused, and through the app each refusal cost ~20x the CPU of this
    check, time taken from the engine and from the requests it admitted. Runs inside
    RequestBodyMiddleware, so the body is in memory; a body that is not a JSON object goes on to the
    app's own 400/422. Without a latency budget it passes every request untouched."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving = self.state.serving
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/recommend"
                or serving is None or not serving.batcher.admission_enabled):
            await self.app(scope, receive, send)
            return
        message = await receive()  # the whole body: RequestBodyMiddleware read it
        if _headed_for_engine(message.get("body", b"")):
            try:
                serving.batcher.check_admission()
            except OverCapacity as refusal:
                scope[ENDPOINT_SCOPE_KEY] = "/recommend"  # no route matched yet: name it for the request metrics
                await _over_capacity_response(refusal)(scope, receive, send)
                return
        await self.app(scope, replaying(message, receive), send)


def _headed_for_engine(body: bytes) -> bool:
    """Whether a /recommend body asks for a search (a non-empty history or a user id); a body the app
    will refuse counts as not, so it gets the app's 400/422."""
    try:
        request = json.loads(body)
    except ValueError:
        return False
    return isinstance(request, dict) and (bool(request.get("history")) or request.get("user_id") is not None)


def _over_capacity_response(refusal: OverCapacity) -> JSONResponse:
    return JSONResponse(error_body(str(refusal)), status_code=429, headers={"Retry-After": str(refusal.retry_after_s)})


class RequestMetricsMiddleware:
    """Request count by endpoint (route template, never the raw path) and status, duration, in-flight."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            endpoint = scope.get(ENDPOINT_SCOPE_KEY) or getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)

