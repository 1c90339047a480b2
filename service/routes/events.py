"""POST /users/{user_id}/events: append interactions to the user's stored history."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.deps import ApiError, ServingDep
from service.history import HistoryStoreError
from service.schemas import ERROR_RESPONSES, EventsRequest, EventsResponse

router = APIRouter(tags=["events"])


@router.post(
    "/users/{user_id}/events",
    response_model=EventsResponse,
    responses=ERROR_RESPONSES,
    summary="Record items a user interacted with (oldest first)",
)
async def append_events(
    user_id: Annotated[str, Path(min_length=1, max_length=256)],
    body: EventsRequest,
    serving: ServingDep,
) -> EventsResponse:
    _, unknown = serving.bundle.lookup(body.item_ids)
    if unknown:  # all or nothing: a history holds only ids the bundle knows
        raise ApiError(
            422,
            f"{len(unknown)} item id(s) are not in the catalog of {serving.bundle.name}/{serving.bundle.version}; "
            "nothing was written. Remove them and resend.",
            errors=[{"loc": "body.item_ids", "message": "unknown item ids", "unknown_item_ids": unknown[:100]}],
        )
    try:
        await serving.store.append(user_id, body.item_ids)
    except HistoryStoreError as error:
        serving.metrics.history_errors.labels(operation="write").inc()
        raise ApiError(503, f"history store unavailable ({error}); events were not recorded, retry later",
                       headers={"Retry-After": "1"}) from error
    return EventsResponse(user_id=user_id, appended=len(body.item_ids))
