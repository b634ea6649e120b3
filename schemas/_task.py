"""The task message: what a producer enqueues and a worker runs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from schemas._base import SCHEMA_VERSION, BoundedJsonObject, Identifier, WireModel
from schemas.limits import MAX_TASK_CHARS

ExecutionMode = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]


def new_task_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class TaskMessage(WireModel):
    """One agent task. ``task_id`` is the idempotency key: the same id never runs to success twice.

    Encoded, a task is at most ``MAX_TASK_BYTES`` (``decode_task`` refuses more; the producer checks it
    before sending) and its metadata nests at most ``MAX_JSON_DEPTH`` levels."""

    schema_version: Literal[1] = SCHEMA_VERSION
    task_id: Identifier = Field(default_factory=new_task_id)
    task: str = Field(min_length=1, max_length=MAX_TASK_CHARS)
    execution_mode: ExecutionMode = "stepwise"
    adapter: Identifier | None = Field(
        default=None, description="Name of one of the worker's configured adapters; None picks the default."
    )
    metadata: BoundedJsonObject = Field(default_factory=dict)
    submitted_at: AwareDatetime = Field(default_factory=utcnow)
