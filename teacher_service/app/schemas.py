"""The REST contract's bodies: columnar (key, seed) items in, labels out."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from labels.namespace import MAX_KEY_LENGTH, MAX_SEED

Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH)]


class Items(BaseModel):
    """Columnar (key, seed) pairs: keys[i] with seeds[i]."""

    model_config = ConfigDict(extra="forbid")
    keys: list[Key]
    seeds: list[Seed]

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.keys) != len(self.seeds):
            raise ValueError(f"keys ({len(self.keys)}) and seeds ({len(self.seeds)}) differ in length")
        return self


class LabelsOut(BaseModel):
    namespace: str
    labels: list[int | None]
    topk: list[list[int] | None] | None = None
    probs: list[list[float] | None] | None = None
    errors: list[str | None] | None = None
    cached: int = 0
    computed: int = 0
    unstored: int = Field(
        0,
        description="labels of this answer the teacher computed but the store refused to keep (a full Redis, "
        "a full disk): correct, but computed again next time; /readyz is 503 while the store refuses writes",
    )


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class ErrorOut(BaseModel):
    """Every error answer: what went wrong, and for a refused body each refused field."""

    error: str
    detail: list[FieldError] | None = None


class LabelsNotFound(LabelsOut):
    """404 of /v1/labels: no item could be labeled; `errors` says why for each."""

    error: str


class Ready(BaseModel):
    status: str
    teacher: str | None = None
    engines: int | None = None
    error: str | None = None


def error(status: int, description: str, retry_after: bool = False) -> dict:
    """An OpenAPI `responses` entry for an error answer."""
    entry: dict = {"model": ErrorOut, "description": description}
    if retry_after:
        entry["headers"] = {
            "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
        }
    return {status: entry}
