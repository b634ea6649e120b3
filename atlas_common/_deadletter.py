"""The headers the pipeline adds to a message: a dead letter's reason (the original body stays untouched),
and a retried task's count and last error."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from aio_pika.abc import FieldValue

REASON_HEADER: Final = "x-atlas-reason"
SOURCE_HEADER: Final = "x-atlas-source"
ROUTING_KEY_HEADER: Final = "x-atlas-original-routing-key"
DEAD_AT_HEADER: Final = "x-atlas-dead-at"
RETRY_HEADER: Final = "x-atlas-retry"
"""How many times the worker sent a task back through the retry tiers (absent on first submission)."""
LAST_ERROR_HEADER: Final = "x-atlas-last-error"
"""The error of a retried task's last run."""
_MAX_REASON_CHARS: Final = 4000


def dead_letter_headers(
    reason: str, *, source: str, routing_key: str, extra: dict[str, FieldValue] | None = None
) -> dict[str, FieldValue]:
    """Headers for a dead letter: why (bounded length), who sent it there, where it was going, when."""
    headers: dict[str, FieldValue] = dict(extra or {})
    headers[REASON_HEADER] = reason[:_MAX_REASON_CHARS]
    headers[SOURCE_HEADER] = source
    headers[ROUTING_KEY_HEADER] = routing_key
    headers[DEAD_AT_HEADER] = datetime.now(UTC).isoformat()
    return headers
