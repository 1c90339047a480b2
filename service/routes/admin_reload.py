"""POST /admin/reload: serve another bundle version without a restart (service/reload.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from service.admin import AdminDep
from service.deps import ApiError
from service.reload import Reloader, ReloadRefused
from service.schemas import ADMIN_RESPONSES, ERROR_RESPONSES, ErrorResponse, ModelRef, ReloadRequest, ReloadResponse

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses=ADMIN_RESPONSES | {
        409: {"model": ErrorResponse, "description": "The bundle was refused (corrupt: a checksum "
              "differs; incompatible: schema version, graph inputs; its warm-up batch failed), or another reload is "
              "in progress. The old bundle keeps serving; the detail says why."},
        422: ERROR_RESPONSES[422], 503: ERROR_RESPONSES[503], 400: ERROR_RESPONSES[400], 413: ERROR_RESPONSES[413],
    },
    summary="Load a bundle version beside the serving one, verify and warm it, then switch (admin token)",
)
async def reload_bundle(_: AdminDep, request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    reloader: Reloader = request.app.state.reloader
    try:
        outcome = await reloader.reload(body.bundle_dir if body is not None else None)
    except ReloadRefused as refused:
        raise ApiError(refused.status_code, refused.detail,
                       headers={"Retry-After": "1"} if refused.status_code == 503 else None) from None
    return ReloadResponse(
        previous=ModelRef(name=outcome.previous.name, version=outcome.previous.version),
        current=ModelRef(name=outcome.current.name, version=outcome.current.version),
        seconds=round(outcome.seconds, 3),
        warnings=outcome.warnings,
    )
