"""Token usage and adapter events: the two things every step reports."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from schemas._base import Json, WireModel
from schemas.limits import MAX_COUNT

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class Usage(WireModel):
    """Token usage of one call or a sum of calls; ``calls`` counts adapter step calls."""

    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0
    calls: Count = 0

    def __add__(self, other: Usage) -> Usage:
        """The sum, each count saturating at ``MAX_COUNT`` (a session's totals never break the limit). Both
        sides are valid, so the sum is too: built without re-validation (it runs for every step)."""
        return Usage.model_construct(
            prompt_tokens=min(self.prompt_tokens + other.prompt_tokens, MAX_COUNT),
            completion_tokens=min(self.completion_tokens + other.completion_tokens, MAX_COUNT),
            total_tokens=min(self.total_tokens + other.total_tokens, MAX_COUNT),
            calls=min(self.calls + other.calls, MAX_COUNT),
        )


def _require_type(event: dict[str, Json]) -> dict[str, Json]:
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError("an adapter event must have a non-empty string 'type'")
    return event


Event = Annotated[dict[str, Json], AfterValidator(_require_type)]
"""One adapter event: any JSON object with a string ``type`` (``tool_call``, ``sql``, ...)."""
