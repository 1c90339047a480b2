"""The catalog API (admin): PUT / GET / DELETE /items/{item_id}; the work is in service/catalog.py."""
from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from service.admin import AdminDep
from service.catalog import CatalogError, CatalogStoreUnavailable, ItemInfo
from service.deps import ApiError, ServingDep
from service.item_schemas import ItemPutRequest, ItemResponse
from service.schemas import ERROR_RESPONSES, ErrorResponse

router = APIRouter(tags=["catalog"])

ItemIdPath = Annotated[str, Path(min_length=1, max_length=256, description="The item's external id.")]

ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No `Authorization: Bearer <GENREC_ADMIN_TOKEN>` header."},
    403: {"model": ErrorResponse, "description": "The bearer token is not GENREC_ADMIN_TOKEN."},
    404: {"model": ErrorResponse, "description": "Admin routes are off (GENREC_ADMIN_TOKEN unset), or, on GET and "
                                                 "DELETE, no item has this id."},
}
_WRITE_ERRORS = {k: ERROR_RESPONSES[k] for k in (400, 408, 413, 422)} | {
    503: {"model": ErrorResponse, "description": "Not ready, or the catalog store (Redis / state file) is "
                                                 "unavailable: nothing was changed, retry."},
}


def _response(info: ItemInfo, created: bool | None = None) -> ItemResponse:
    return ItemResponse(**asdict(info), created=created)


async def _run(coro: Any) -> Any:
    try:
        return await coro
    except CatalogError as e:
        raise ApiError(e.status, e.detail) from e
    except CatalogStoreUnavailable as e:
        raise ApiError(503, f"{e}; nothing was changed, retry later", headers={"Retry-After": "1"}) from e


@router.put(
    "/items/{item_id}",
    response_model=ItemResponse,
    status_code=200,
    responses=ADMIN_RESPONSES | _WRITE_ERRORS | {
        201: {"model": ItemResponse, "description": "Added: the item has codes and is recommendable."},
        409: {"model": ErrorResponse, "description": "The item's code tuple has no free collision slot, or this "
                                                     "bundle / engine cannot add items (the detail says why)."},
    },
    summary="Add or update an item (admin): codes from its text, recommendable when this answers",
)
async def put_item(item_id: ItemIdPath, body: ItemPutRequest, serving: ServingDep, _admin: AdminDep,
                   response: Response) -> ItemResponse:
    info, created = await _run(serving.catalog.put(item_id, body.title, body.text, body.attributes))
    if created:
        response.status_code = 201
    return _response(info, created)


@router.get(
    "/items/{item_id}",
    response_model=ItemResponse,
    responses=ADMIN_RESPONSES | {503: ERROR_RESPONSES[503]},
    summary="An item's codes and state (admin)",
)
async def get_item(item_id: ItemIdPath, serving: ServingDep, _admin: AdminDep) -> ItemResponse:
    try:
        return _response(serving.catalog.info(item_id))
    except CatalogError as e:
        raise ApiError(e.status, e.detail) from e


@router.delete(
    "/items/{item_id}",
    response_model=ItemResponse,
    responses=ADMIN_RESPONSES | {
        409: {"model": ErrorResponse, "description": "The item is the last recommendable one."},
        503: _WRITE_ERRORS[503],
    },
    summary="Take an item out of recommendations (admin); it stays readable in histories",
)
async def delete_item(item_id: ItemIdPath, serving: ServingDep, _admin: AdminDep) -> ItemResponse:
    return _response(await _run(serving.catalog.delete(item_id)))
