"""POST /recommend: history (request, else store) -> micro-batched beam search -> items."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import numpy as np
from fastapi import APIRouter, Response

from service.catalog import CatalogView
from service.constraints import UnknownAttribute, resolve_constraint
from service.deps import ApiError, Serving, ServingDep
from service.history import HistoryStoreError
from service.schemas import AUTH_RESPONSES, ERROR_RESPONSES, ModelRef, RecommendedItem, RecommendRequest, RecommendResponse

router = APIRouter(tags=["recommend"])

_PREVIEW = 10  # unknown ids quoted in a warning


@router.post(
    "/recommend",
    response_model=RecommendResponse,
    responses=ERROR_RESPONSES | AUTH_RESPONSES,
    summary="Recommend the next items for a history or a user",
)
async def recommend(body: RecommendRequest, serving: ServingDep) -> Response:
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + serving.settings.request_timeout_ms / 1000.0
    metrics = serving.metrics
    warnings: list[str] = []

    # Constraints first: a bad filter is refused before any queue or Redis work. They are resolved over
    # the catalog as it is now (added items included, deleted ones out).
    catalog = serving.catalog.current
    restrictions = serving.catalog.restrictions()
    try:
        constraint, constraint_warnings = resolve_constraint(body.include, body.exclude, body.filters,
                                                             catalog.lookup, restrictions.attributes)
    except UnknownAttribute as error:
        raise ApiError(422, f"Invalid request: body.filters: {error}",
                       errors=[{"loc": "body.filters", "message": str(error), "type": "unknown_attribute",
                                "known": error.known}]) from None
    warnings += constraint_warnings
    restriction = restrictions.get(constraint) if constraint is not None else None
    popularity = catalog.popularity if restriction is None else restriction.popular
    matching = "" if restriction is None else " matching"
    if restriction is not None and restriction.count == 0:
        warnings.append(f"no item matches the constraints ({constraint.describe()}): nothing to recommend")
        return _respond(serving, catalog, [], "popular", False, warnings, loop, loop.time())

    with serving.batcher.coming():
        raw_history, degraded = await _resolve_history(body, serving, warnings)
    history_done = loop.time()
    metrics.stages["history"].observe(history_done - started)

    known, unknown = catalog.lookup(raw_history)
    if unknown:
        more = f" (and {len(unknown) - _PREVIEW} more)" if len(unknown) > _PREVIEW else ""
        warnings.append(f"dropped {len(unknown)} unknown item id(s): {unknown[:_PREVIEW]}{more}")
    if len(known) > serving.max_history:
        warnings.append(f"history has {len(known)} known items; the model reads the most recent {serving.max_history}")
    model_history = known[-serving.max_history :]
    excluded = set(known) if body.exclude_history else set()

    if model_history:
        result = await serving.batcher.submit(np.asarray(model_history, dtype=np.int64), deadline, restriction)
        metrics.stages["queue"].observe(result.queue_wait_s)
        metrics.stages["engine"].observe(result.engine_s)
        response_started = loop.time()
        strategy = "generative"
        # The batch may have run on a newer catalog than the view read above: re-read it (it is at least
        # the batch's), and leave out items deleted since the batch's trie was built.
        catalog = serving.catalog.current
        beam_items, beam_scores = result.item_indices, result.scores
        if serving.bundle.fusion is not None:  # the beam fused with the newest item's successors (service/fusion.py)
            beam_items, beam_scores = serving.bundle.fusion.fuse(
                beam_items, model_history[-1], None if restriction is None else restriction.allowed)
        gone = {int(i) for i in beam_items if i >= 0 and not catalog.live[i]}
        popularity = catalog.popularity if restriction is None else restriction.popular[catalog.live[restriction.popular]]
        ranked, from_beam = merge_with_popularity(beam_items, beam_scores, popularity, body.k, excluded | gone)
        if from_beam < body.k and (restriction is None or len(ranked) > from_beam):  # constrained: only when the fill added some
            warnings.append(
                f"beam search (width {serving.engine.beam_size}) gave {from_beam} item(s) after exclusions; "
                f"the rest come from the popularity ranking{' of the matching items' if matching else ''}"
            )
    else:
        response_started = loop.time()
        strategy = "popular"
        ranked, _ = merge_with_popularity((), (), popularity, body.k, excluded)
        warnings.append(f"no known history items: returning the most popular{matching} items")
    if len(ranked) < body.k:
        if restriction is not None:
            warnings.append(f"only {len(ranked)} item(s) match the constraints ({constraint.describe()}) after "
                            f"exclusions (k={body.k}): returning all of them")
        else:
            warnings.append(f"only {len(ranked)} item(s) available after exclusions (k={body.k})")
    return _respond(serving, catalog, ranked, strategy, degraded, warnings, loop, response_started)


def _respond(serving: Serving, catalog: CatalogView, ranked: list[tuple[int, float | None]], strategy: str,
             degraded: bool, warnings: list[str], loop: asyncio.AbstractEventLoop, response_started: float) -> Response:
    metrics = serving.metrics
    bundle = serving.bundle
    response = RecommendResponse(
        items=[RecommendedItem(item_id=catalog.item_ids[i], title=catalog.titles[i], score=s) for i, s in ranked],
        model=ModelRef(name=bundle.name, version=bundle.version),
        strategy=strategy,
        degraded=degraded,
        warnings=warnings,
    )
    metrics.strategies[strategy].inc()
    metrics.stages["response"].observe(loop.time() - response_started)
    # Serialized here, once: a returned model would be validated and serialized again by FastAPI
    # against response_model, which the OpenAPI schema still documents.
    return Response(response.model_dump_json(), media_type="application/json")


async def _resolve_history(body: RecommendRequest, serving: Serving, warnings: list[str]) -> tuple[list[str], bool]:
    """(history item ids oldest first, degraded). A failing store costs the stored history, not the request."""
    if body.history:
        return list(body.history), False
    if body.user_id is None:
        return [], False
    metrics = serving.metrics
    try:
        history = await serving.history_reader.get(body.user_id)
    except HistoryStoreError:
        metrics.history_errors.labels(operation="read").inc()
        metrics.degraded.inc()
        warnings.append("history store unavailable: answered without the user's stored history")
        return [], True
    (metrics.history_hits if history else metrics.history_misses).inc()
    return history, False


def merge_with_popularity(
    beam_items: Iterable[int],
    beam_scores: Iterable[float],
    popularity: Sequence[int] | np.ndarray,
    k: int,
    excluded: set[int],
) -> tuple[list[tuple[int, float | None]], int]:
    """Beam results in order (skipping -1, excluded and repeated items), then popular items to reach k.

    Returns ([(item index, score or None for popularity fill)], number taken from the beam)."""
    ranked: list[tuple[int, float | None]] = []
    seen: set[int] = set()
    for item, score in zip(beam_items, beam_scores):
        item = int(item)
        if len(ranked) == k:
            break
        if item < 0 or item in excluded or item in seen:
            continue
        ranked.append((item, float(score)))
        seen.add(item)
    from_beam = len(ranked)
    for item in popularity:
        if len(ranked) == k:
            break
        item = int(item)
        if item in excluded or item in seen:
            continue
        ranked.append((item, None))
        seen.add(item)
    return ranked, from_beam
