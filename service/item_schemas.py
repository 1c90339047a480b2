"""Bodies of the catalog API (`/items/{item_id}`, service/routes/items.py)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from service.schemas import AttributeName, AttributeValue

MAX_TITLE = 512
MAX_TEXT = 20_000
MAX_ATTRIBUTES = 32  # keys per item
MAX_VALUES = 64  # values per key


class ItemPutRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "title": "Rose hand cream 50 ml",
            "text": "Rose hand cream 50 ml. Skin care, hands. Brand: Florame. Rich cream with rose oil.",
            "attributes": {"brand": "Florame", "category": ["Skin Care", "Hands"]},
        }]},
    )

    title: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_TITLE)] = Field(
        description="What responses show for the item.")
    text: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_TEXT)] = Field(
        description="What the text encoder reads to give a new item its codes (title, category, brand, "
                    "description...), as the catalog's items were embedded at training time.")
    attributes: dict[AttributeName, AttributeValue | list[AttributeValue]] = Field(
        default_factory=dict, max_length=MAX_ATTRIBUTES,
        description="Item attributes for filters, a name -> one value or a list of values.")

    @field_validator("title", "text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain more than whitespace")
        return value

    @field_validator("attributes")
    @classmethod
    def _values_as_lists(cls, value: dict[str, Any]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, values in value.items():
            values = [values] if isinstance(values, str) else list(values)
            if not values or len(values) > MAX_VALUES:
                raise ValueError(f"attribute {name!r} needs 1 to {MAX_VALUES} values")
            out[name] = values
        return out


class ItemResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "item_id": "new-123", "title": "Rose hand cream 50 ml", "codes": [12, 201, 7, 3], "state": "active",
        "source": "added", "attributes": {"brand": ["Florame"]}, "text": "Rose hand cream 50 ml. ...",
        "updated_at": 1796000000.0, "catalog_version": 4}]})

    item_id: str
    title: str
    codes: list[int] = Field(description="The item's semantic ID, the collision level last.")
    state: Literal["active", "deleted"] = Field(description="active: recommendable; deleted: never recommended, "
                                                            "still read in histories.")
    source: Literal["bundle", "added"] = Field(description="bundle: trained on; added: through PUT /items.")
    attributes: dict[str, list[str]]
    text: str | None = Field(description="The text last PUT for it (null: only the bundle's data).")
    updated_at: float | None = Field(description="Unix time of the last change through the API.")
    catalog_version: int = Field(description="Changes this process has applied; grows with every change.")
    created: bool | None = Field(None, description="PUT only: true when the item was added, false when updated.")
