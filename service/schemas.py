"""Request and response bodies of the HTTP API (separate types for each direction)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, StringConstraints, WithJsonSchema

MAX_K = 100


_JSON_TYPE_NAMES = {bool: "boolean", float: "number", type(None): "null", list: "array", dict: "object"}
MAX_ID_LENGTH = 256


def _to_item_id(value: Any) -> str:
    # bool is an int subclass: refuse it explicitly rather than turning True into "True".
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        got = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
        raise ValueError(f"item ids must be strings or integers, got {got}")
    item_id = str(value)
    if not 1 <= len(item_id) <= MAX_ID_LENGTH:
        raise ValueError(f"item ids must be 1 to {MAX_ID_LENGTH} characters")
    return item_id


# Item ids may arrive as JSON strings or integers; the service treats them as strings.
ItemId = Annotated[
    str,
    PlainValidator(_to_item_id),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}, {"type": "integer"}]}),
]
UserId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ID_LENGTH)]


def _whole_number(value: Any) -> Any:
    """JSON has one number type: 18.0 is the integer 18; 18.5, "18" and true are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        got = _JSON_TYPE_NAMES.get(type(value), "string" if isinstance(value, str) else type(value).__name__)
        raise ValueError(f"must be an integer, got {got}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be a whole number, got {value}")
        return int(value)
    return value


# An integer as JSON numbers carry it: 18 or 18.0 (the schema says integer).
WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
EventId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=128)]


MAX_CONSTRAINT_IDS = 5000
AttributeName = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=64)]
AttributeValue = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ID_LENGTH)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "A1B2C3", "k": 10},
                {"history": ["B0001", "B0002", 12345], "k": 5, "exclude_history": True},
                {"user_id": "A1B2C3", "k": 5, "filters": {"category": "Nail Polish"}, "exclude": ["B0003"]},
            ]
        },
    )

    user_id: UserId | None = Field(
        None, description="Read the history from the store for this user when `history` is absent or empty."
    )
    history: list[ItemId] | None = Field(
        None,
        description="Item ids the user interacted with, oldest first (strings or integers). "
        "Overrides the stored history when non-empty.",
    )
    k: Annotated[WholeNumber, Field(ge=1, le=MAX_K, description="Number of items to return.")] = 10
    exclude_history: Annotated[bool, Field(strict=True, description="Leave history items out of the results.")] = True
    include: list[ItemId] | None = Field(
        None, min_length=1, max_length=MAX_CONSTRAINT_IDS,
        description="Recommend only among these item ids (unknown ids are ignored, with a warning).")
    exclude: list[ItemId] | None = Field(
        None, max_length=MAX_CONSTRAINT_IDS,
        description="Never recommend these item ids (unknown ids are ignored, with a warning).")
    filters: dict[AttributeName, AttributeValue | Annotated[list[AttributeValue], Field(min_length=1, max_length=100)]] | None = Field(
        None, max_length=16,
        description="Item attribute -> value or list of values (GET /info lists the attributes): an item passes when it "
        "has one of the values of every attribute named. Unknown attribute -> 422. Applied inside the beam search, so "
        "k matching items come back whenever k exist.")


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float | None = Field(
        description="Sum of the log-probabilities of the item's codes, each renormalized over the codes the catalog "
        "allows after the ones before it (plus the item head's log-probability for models with one); for a bundle "
        "with transition fusion (manifest.fusion), the item's fused reciprocal-rank score; null for items filled "
        "from popularity."
    )


class ModelRef(BaseModel):
    name: str
    version: str


class RecommendResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [{"item_id": "B0003", "title": "Rose hand cream", "score": -1.93}],
                    "model": {"name": "beauty-tiger", "version": "20261123-0400"},
                    "strategy": "generative",
                    "degraded": False,
                    "warnings": [],
                }
            ]
        }
    )

    items: list[RecommendedItem]
    model: ModelRef
    strategy: Literal["generative", "popular"] = Field(
        description="generative: beam search over the history; popular: no usable history, most popular items."
    )
    degraded: bool = Field(description="True when the history store failed and the stored history was not used.")
    warnings: list[str]


class EventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"item_ids": ["B0001", "B0002"], "event_id": "3f6c1a9e-click-0001"}]},
    )

    item_ids: list[ItemId] = Field(min_length=1, description="Item ids the user interacted with, oldest first.")
    event_id: EventId | None = Field(
        None,
        description="Idempotency key (or send the Idempotency-Key header): a retry with the same id is acknowledged "
        "as a duplicate and not appended again.",
    )


class EventsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"user_id": "A1B2C3", "appended": 2, "status": "stored",
                                         "event_id": "3f6c1a9e-click-0001", "duplicate": False}]}
    )

    user_id: str
    appended: int = Field(description="Items appended by this request (0 for a duplicate).")
    status: Literal["stored", "spooled"] = Field(
        description="stored: in Redis (or the in-process store); spooled: Redis was unreachable, the event is in the "
        "service's fsynced spool and will be written to Redis, in order, when it is back."
    )
    event_id: str = Field(description="The idempotency key used: the one sent, else one the service chose.")
    duplicate: bool = Field(
        description="True when this event_id was already recorded (by an earlier request, or by this request's own "
        "first write to Redis, which timed out and was retried); nothing more was appended. Either way the event is "
        "recorded once."
    )


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong and what to change.")
    errors: list[dict[str, Any]] | None = Field(None, description="One entry per invalid field, where relevant.")


class HealthResponse(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    reason: str | None = None


class InfoResponse(BaseModel):
    name: str
    version: str
    dataset: str
    created_at: str | None
    num_items: int
    levels: int
    beam_size: int
    max_history: int
    metrics: dict[str, Any] = Field(description="Evaluation metrics the bundle was exported with.")
    engine: str
    provider: str
    history_store: str
    attributes: list[str] = Field(default_factory=list,
                                  description="Item attributes `filters` in POST /recommend can name (empty: none).")


# Documented error responses, shared by the routes.
_VALIDATION_EXAMPLE = {
    "detail": "Invalid request: body.k: Input should be less than or equal to 100",
    "errors": [{"loc": "body.k", "message": "Input should be less than or equal to 100", "type": "less_than_equal"}],
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON (the detail gives the position)."},
    408: {"model": ErrorResponse, "description": "The request body did not arrive within GENREC_REQUEST_READ_TIMEOUT_S."},
    413: {"model": ErrorResponse, "description": "Request body larger than GENREC_MAX_BODY_BYTES."},
    422: {
        "model": ErrorResponse,
        "description": "A wrong type, a value out of range, or a missing or unknown field.",
        "content": {"application/json": {"example": _VALIDATION_EXAMPLE}},
    },
    429: {"model": ErrorResponse, "description": "Over capacity (the wait would pass the latency budget, or the queue "
                                                 "is full) or over this client's rate; retry after Retry-After seconds."},
    503: {"model": ErrorResponse, "description": "Not ready, shutting down, or the request deadline passed."},
}
# The routes that need an API key when keys are configured.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No X-API-Key header (API keys are configured)."},
    403: {"model": ErrorResponse, "description": "The X-API-Key is not one of the configured keys."},
}


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}, {"bundle_dir": "beauty-tiger/20261205-0400"}]})

    bundle_dir: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = Field(
        None, description="The bundle folder to load (relative paths are under GENREC_MODELS_ROOT); absent: the newest "
        "bundle under GENREC_MODELS_ROOT.")


class ReloadResponse(BaseModel):
    previous: ModelRef
    current: ModelRef
    seconds: float = Field(description="Load, checksum verification, engine build, warm-up and swap.")
    warnings: list[str]


ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No 'Authorization: Bearer <token>' header."},
    403: {"model": ErrorResponse, "description": "The bearer token is not GENREC_ADMIN_TOKEN."},
    404: {"model": ErrorResponse, "description": "Admin routes are off (GENREC_ADMIN_TOKEN unset), or no such bundle."},
}
