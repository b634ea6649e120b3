"""Token usage and adapter events: the two things every step reports."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from schemas._base import Json, WireModel

NonNegative = Annotated[int, Field(ge=0)]


class Usage(WireModel):
    """Token usage of one call or a sum of calls; ``calls`` counts adapter step calls."""

    prompt_tokens: NonNegative = 0
    completion_tokens: NonNegative = 0
    total_tokens: NonNegative = 0
    calls: NonNegative = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            calls=self.calls + other.calls,
        )


def _require_type(event: dict[str, Json]) -> dict[str, Json]:
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError("an adapter event must have a non-empty string 'type'")
    return event


Event = Annotated[dict[str, Json], AfterValidator(_require_type)]
"""One adapter event: any JSON object with a string ``type`` (``tool_call``, ``sql``, ...)."""
