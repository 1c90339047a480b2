"""Liveness, readiness and what is being served."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import ServingDep, StateDep
from service.schemas import ERROR_RESPONSES, HealthResponse, InfoResponse

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=HealthResponse, summary="The process is up")
async def live() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/health/ready",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Starting (bundle, trie, warm-up) or draining."}},
    summary="Bundle loaded, trie resident, warm-up batch done, not draining",
)
async def ready(state: StateDep) -> HealthResponse | JSONResponse:
    if state.ready:
        return HealthResponse(status="ready")
    body = HealthResponse(status="not_ready", reason=state.not_ready_reason)
    return JSONResponse(body.model_dump(), status_code=503)


@router.get("/info", response_model=InfoResponse, responses={503: ERROR_RESPONSES[503]}, summary="The bundle being served")
async def info(serving: ServingDep) -> InfoResponse:
    bundle = serving.bundle
    return InfoResponse(
        name=bundle.name,
        version=bundle.version,
        dataset=bundle.dataset,
        created_at=bundle.manifest.created_at or None,
        num_items=bundle.num_items,
        levels=bundle.levels,
        beam_size=bundle.beam_size,
        max_history=serving.max_history,
        metrics=bundle.manifest.metrics,
        engine=serving.engine_kind,
        provider=serving.engine.provider,
        history_store=serving.store.backend,
        attributes=serving.catalog.restrictions().attributes.names,
    )
