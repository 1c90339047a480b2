"""POST /users/{user_id}/events: append interactions to the user's stored history, durably and once."""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Path

from service.deps import ApiError, ServingDep
from service.history import HistoryStoreError
from service.schemas import AUTH_RESPONSES, ERROR_RESPONSES, EventsRequest, EventsResponse
from service.spool import SpoolFull

router = APIRouter(tags=["events"])

_NOT_RECORDED = "events were not recorded, retry later with the same event_id"


@router.post(
    "/users/{user_id}/events",
    response_model=EventsResponse,
    responses=ERROR_RESPONSES | AUTH_RESPONSES,
    summary="Record items a user interacted with (oldest first); retries with the same event_id are not re-applied",
)
async def append_events(
    user_id: Annotated[str, Path(min_length=1, max_length=256)],
    body: EventsRequest,
    serving: ServingDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=128,
               description="The event's idempotency key; the same as sending `event_id` in the body."),
    ] = None,
) -> EventsResponse:
    _, unknown = serving.catalog.current.lookup(body.item_ids)
    if unknown:  # all or nothing: a history holds only ids the bundle knows
        raise ApiError(
            422,
            f"{len(unknown)} item id(s) are not in the catalog of {serving.bundle.name}/{serving.bundle.version} "
            "(nor added with PUT /items); "
            "nothing was written. Remove them and resend.",
            errors=[{"loc": "body.item_ids", "message": "unknown item ids", "unknown_item_ids": unknown[:100]}],
        )
    if body.event_id is not None and idempotency_key is not None and body.event_id != idempotency_key:
        raise ApiError(422, "event_id in the body and the Idempotency-Key header differ; send one of them",
                       errors=[{"loc": "body.event_id", "message": "differs from the Idempotency-Key header"}])
    # Every event gets an id, so a spooled copy of a write that did reach Redis is not applied twice.
    event_id = body.event_id or idempotency_key or uuid.uuid4().hex
    try:
        outcome = await serving.events.write(user_id, body.item_ids, event_id)
    except SpoolFull as error:
        raise ApiError(503, f"{error}; {_NOT_RECORDED}", headers={"Retry-After": "5"}) from error
    except HistoryStoreError as error:
        serving.metrics.history_errors.labels(operation="write").inc()
        raise ApiError(503, f"history store unavailable ({error}); {_NOT_RECORDED}",
                       headers={"Retry-After": "1"}) from error
    except OSError as error:  # the spool's disk failed
        raise ApiError(503, f"the event spool cannot be written ({error.strerror}); {_NOT_RECORDED}",
                       headers={"Retry-After": "5"}) from error
    return EventsResponse(user_id=user_id, appended=0 if outcome.duplicate else len(body.item_ids),
                          status=outcome.status, event_id=event_id, duplicate=outcome.duplicate)
