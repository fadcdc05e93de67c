"""API schemas: they validate requests and generate the OpenAPI document, from one source."""

from __future__ import annotations

import copy
from datetime import datetime
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .bounds import (
    IDEMPOTENCY_KEY_MAX,
    LIST_MAX,
    MODEL_NAME_MAX,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    PROMPT_CEILING,
    SYSTEM_MAX_CHARS,
)
from .models import MAX_ID, TaskStatus

Status = Literal[tuple(status.value for status in TaskStatus)]


class Strict(BaseModel):
    """JSON bodies: no type coercion, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Parameters(BaseModel):
    """Headers and query strings: their JSON schema is built once, not on every request.

    flask-openapi3 (4.3) calls `model_json_schema()` on every request that has a header or
    query model, to look up each field's type, and building it is a large share of a small
    request's CPU. The schema of a class never changes.
    """

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return copy.deepcopy(_json_schema(cls, *args, **kwargs))


@cache
def _json_schema(model: type[BaseModel], *args: Any, **kwargs: Any) -> dict[str, Any]:
    return BaseModel.model_json_schema.__func__(model, *args, **kwargs)


class TaskParams(Strict):
    max_tokens: int | None = Field(
        None, ge=1, le=1_000_000, description="Cap on the answer's length in tokens; at most the model's limit."
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature; the model's default when absent."
    )
    system: str | None = Field(None, max_length=SYSTEM_MAX_CHARS, description="A system prompt.")


class TaskCreate(Strict):
    prompt: str = Field(
        min_length=1,
        max_length=PROMPT_CEILING,
        description="The prompt (1-32,000 characters; an operator may set less).",
    )
    model: str | None = Field(
        None, max_length=MODEL_NAME_MAX, description="A model name from GET /models; the default model when absent."
    )
    priority: int = Field(PRIORITY_DEFAULT, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="1 (lowest) to 10 (highest).")
    params: TaskParams | None = None


class SubmitHeaders(Parameters):
    idempotency_key: str | None = Field(
        None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        description="Replays with the same key and body return the first task (keys expire after 24 h).",
    )


class TaskPath(BaseModel):
    task_id: int = Field(ge=1, le=MAX_ID)


class TaskQuery(Parameters):
    # A misspelt parameter (?statuss=FAILED) is an error, not a silently unfiltered list.
    model_config = ConfigDict(extra="forbid")

    status: Status | None = None
    limit: int = Field(20, ge=1, le=LIST_MAX)
    cursor: str | None = Field(
        None, max_length=200, pattern=r"^[A-Za-z0-9_-]+$", description="next_cursor from the previous page."
    )


class Usage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None


class TaskOut(BaseModel):
    id: int
    prompt: str
    model: str
    priority: int = Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)
    params: TaskParams
    status: Status
    progress: int = Field(ge=0, le=100)
    result: str | None = Field(description="The text so far while PROCESSING, all of it when COMPLETED.")
    error: str | None
    attempts: int
    usage: Usage | None
    finish_reason: str | None = Field(
        description='Why the answer ended: "stop" (the model finished) or "length" (cut off at max_tokens: '
        "raise it and submit again); null until it completes or when the provider did not say."
    )
    served_by: str | None = Field(description="The catalog model that answered; differs from model after a fallback.")
    cost_usd: float | None = Field(description="What the answer cost in US dollars, at the prices of served_by then.")
    batch_id: str | None = Field(description="The batch whose line this task is; null outside a batch.")
    custom_id: str | None = Field(description="The batch line's custom_id; null outside a batch.")
    messages: list[dict] | None = Field(
        description="The chat as sent, when a batch line gave more than one message; null otherwise."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class TaskList(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class ModelInfo(BaseModel):
    name: str
    default: bool
    description: str
    max_tokens: int
    default_max_tokens: int
    temperature: float
    usd_per_million_input_tokens: float
    usd_per_million_output_tokens: float
    fallbacks: list[str] = Field(description="Models tried next, in order, when this one is unavailable.")


class ModelList(BaseModel):
    items: list[ModelInfo]


class UsageQuery(Parameters):
    model_config = ConfigDict(extra="forbid")

    month: str | None = Field(None, max_length=20, description="YYYY-MM (UTC); this month when absent.")


class ModelUsage(BaseModel):
    model: str = Field(description="The model that answered.")
    tasks: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class DayUsage(BaseModel):
    day: str
    tasks: int
    cost_usd: float


class UsageOut(BaseModel):
    month: str
    spent_usd: float = Field(description="What answers that finished this month cost.")
    reserved_usd: float = Field(description="Held by unfinished tasks: the most they can still cost.")
    budget_usd: float | None = Field(description="The monthly budget; null for no limit.")
    by_model: list[ModelUsage]
    by_day: list[DayUsage]


class Check(BaseModel):
    status: Literal["ok", "error", "none"]
    latency_ms: float | None = None
    count: int | None = None
    error: str | None = None


class Health(BaseModel):
    """Anyone gets each check's status; the version and the checks' details (latency, count,
    error) only with an admin's API token or METRICS_TOKEN as the bearer."""

    status: Literal["healthy", "unhealthy"]
    app_name: str
    version: str | None
    timestamp: datetime
    checks: dict[str, Check]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict | None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
