"""The demo page (`GET /`) and the read-only helpers it calls under /demo.

The page (service/static/demo.html, plain HTML and JS) works on a session user `demo-...` of its own:
it writes events through the public `POST /users/{id}/events`, asks `POST /recommend` by that user
id, and shows the stored history. The helpers: item search by title, sample users from a sequences
file (`GENREC_DEMO_USERS_FILE`, the dataset's `user item item ...` lines), and the stored history of
`demo-` users only (other users' histories are not readable here). `GENREC_DEMO_PAGE=false` turns
all of it off.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from service.bundle import Bundle
from service.deps import ApiError, ServingDep, StateDep
from service.schemas import ERROR_RESPONSES, ErrorResponse
from service.history import HistoryStoreError

router = APIRouter(tags=["demo"], responses={
    403: {"model": ErrorResponse, "description": "Only the page's own users can be read here."},
    404: {"model": ErrorResponse, "description": "The demo page is off, or the user is unknown."},
    422: ERROR_RESPONSES[422], 503: ERROR_RESPONSES[503]})

PAGE = Path(__file__).resolve().parent.parent / "static" / "demo.html"
DEMO_USER_PREFIX = "demo-"
SAMPLE_USERS = 40  # users offered in the page's picker


class DemoItem(BaseModel):
    item_id: str
    title: str


class DemoUser(BaseModel):
    user_id: str
    items: int  # known items in the user's sequence


class DemoUserSequence(BaseModel):
    user_id: str
    past: list[DemoItem]  # every known item but the last, oldest first
    held_out: DemoItem | None  # the last item: what the model would ideally recommend


class DemoHistory(BaseModel):
    user_id: str
    items: list[DemoItem]


@dataclass(frozen=True)
class DemoCatalog:
    """Per bundle: lower-cased titles for search, and the users of the sequences file (known items only)."""

    bundle: Bundle
    search_keys: list[str]
    users: dict[str, list[int]]

    @classmethod
    def build(cls, bundle: Bundle, users_file: Path | None) -> DemoCatalog:
        keys = [f"{title} {item_id}".lower() for title, item_id in zip(bundle.titles, bundle.item_ids)]
        users: dict[str, list[int]] = {}
        if users_file is not None:
            with open(users_file) as lines:
                for line in lines:
                    user_id, *item_ids = line.split()
                    known = [bundle.index_of[i] for i in item_ids if i in bundle.index_of]
                    if len(known) >= 2:  # a past and a held-out item
                        users[user_id] = known
        return cls(bundle, keys, users)

    def item(self, index: int) -> DemoItem:
        return DemoItem(item_id=self.bundle.item_ids[index], title=self.bundle.titles[index])


async def require_demo(state: StateDep) -> None:
    if not state.settings.demo_page:
        raise ApiError(404, "the demo page is off (GENREC_DEMO_PAGE=false)")


async def get_catalog(request: Request, serving: ServingDep) -> DemoCatalog:
    """Built on first use for the bundle being served (reading the users file takes a moment)."""
    catalog: DemoCatalog | None = getattr(request.app.state, "demo_catalog", None)
    if catalog is None or catalog.bundle is not serving.bundle:
        catalog = await asyncio.to_thread(DemoCatalog.build, serving.bundle, serving.settings.demo_users_file)
        request.app.state.demo_catalog = catalog
    return catalog


CatalogDep = Annotated[DemoCatalog, Depends(get_catalog)]
DEMO_ONLY = [Depends(require_demo)]


@router.get("/", response_class=HTMLResponse, dependencies=DEMO_ONLY, summary="The demo page", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


@router.get("/demo/items", response_model=list[DemoItem], dependencies=DEMO_ONLY, summary="Items whose title or id contains q")
async def search_items(catalog: CatalogDep, q: Annotated[str, Query(min_length=1, max_length=100)],
                       limit: Annotated[int, Query(ge=1, le=50)] = 12) -> list[DemoItem]:
    needle = q.lower()
    found: list[DemoItem] = []
    for index, key in enumerate(catalog.search_keys):
        if needle in key:
            found.append(catalog.item(index))
            if len(found) == limit:
                break
    return found


@router.get("/demo/users", response_model=list[DemoUser], dependencies=DEMO_ONLY,
            summary="Sample users of GENREC_DEMO_USERS_FILE (empty when unset)")
async def sample_users(catalog: CatalogDep) -> list[DemoUser]:
    return [DemoUser(user_id=user_id, items=len(items)) for user_id, items in list(catalog.users.items())[:SAMPLE_USERS]]


@router.get("/demo/users/{user_id}", response_model=DemoUserSequence, dependencies=DEMO_ONLY,
            summary="A user's sequence from GENREC_DEMO_USERS_FILE: the past and the held-out last item")
async def user_sequence(user_id: str, catalog: CatalogDep, serving: ServingDep) -> DemoUserSequence:
    items = catalog.users.get(user_id)
    if items is None:
        raise ApiError(404, f"user {user_id!r} is not in the demo users file ({serving.settings.demo_users_file})")
    past = items[:-1][-serving.max_history:]
    return DemoUserSequence(user_id=user_id, past=[catalog.item(i) for i in past], held_out=catalog.item(items[-1]))


@router.get("/demo/history/{user_id}", response_model=DemoHistory, dependencies=DEMO_ONLY,
            summary="The stored history of a demo- session user, oldest first")
async def demo_history(user_id: str, serving: ServingDep) -> DemoHistory:
    if not user_id.startswith(DEMO_USER_PREFIX):
        raise ApiError(403, f"only the page's own users ({DEMO_USER_PREFIX}...) can be read here")
    try:
        stored = (await serving.store.get_many([user_id]))[user_id]
    except HistoryStoreError as error:
        raise ApiError(503, f"history store unavailable ({error})", headers={"Retry-After": "1"}) from error
    view = serving.catalog.current  # items added through PUT /items too
    known, _ = view.lookup(stored)
    return DemoHistory(user_id=user_id, items=[DemoItem(item_id=view.item_ids[i], title=view.titles[i]) for i in known])
