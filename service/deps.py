"""Runtime state of the app and the route dependencies, as `Annotated` aliases."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from service.batcher import MicroBatcher
from service.bundle import Bundle
from service.catalog import Catalog
from service.config import Settings
from service.engine import BeamEngine
from service.history import CoalescingHistoryReader, HistoryStore
from service.metrics import ServiceMetrics
from service.spool import DurableEventWriter


class ApiError(Exception):
    """An error with a status and a message that says what to fix; rendered as ErrorResponse."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors
        self.headers = headers


class NotReady(ApiError):
    def __init__(self, reason: str) -> None:
        super().__init__(503, f"service not ready: {reason}", headers={"Retry-After": "1"})


@dataclass(frozen=True)
class Serving:
    """Everything a request needs once the service is up; built by the app's lifespan."""

    settings: Settings
    bundle: Bundle
    engine: BeamEngine
    engine_kind: str
    batcher: MicroBatcher
    store: HistoryStore
    history_reader: CoalescingHistoryReader
    events: DurableEventWriter
    metrics: ServiceMetrics
    max_history: int  # history items fed to the model
    catalog: Catalog  # the items as they are now (added, deleted); recommend and events read catalog.current,
    # constraints catalog.restrictions()


@dataclass
class AppState:
    settings: Settings
    metrics: ServiceMetrics
    serving: Serving | None = None
    ready: bool = False  # what /health/ready says
    accepting: bool = False  # whether routes take work: stays true through the drain period
    draining: bool = False  # a stop signal came: never ready again
    not_ready_reason: str = "starting: loading the bundle"

    def start_draining(self) -> None:
        """Readiness off (a load balancer stops sending), work still taken until the server stops."""
        self.draining = True
        self.ready = False
        self.not_ready_reason = "draining: shutting down"


# The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency
# in its thread pool, a thread hand-off per request that cost ~10% of the event loop under load.
async def get_state(request: Request) -> AppState:
    return request.app.state.genrec


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.genrec.metrics


async def get_serving(request: Request) -> Serving:
    """The serving components, or 503 while starting or stopping (not during the drain period)."""
    state: AppState = request.app.state.genrec
    if not state.accepting or state.serving is None:
        state.metrics.rejections.labels(reason="not_ready" if state.serving is None else "draining").inc()
        raise NotReady(state.not_ready_reason)
    return state.serving


StateDep = Annotated[AppState, Depends(get_state)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
ServingDep = Annotated[Serving, Depends(get_serving)]
