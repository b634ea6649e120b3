"""Token usage and adapter events: the two things every step reports."""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import ConfigDict, Field, GetPydanticSchema
from typing_extensions import TypedDict

from schemas._base import JsonObject, WireModel
from schemas.limits import MAX_COUNT

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class Usage(WireModel):
    """Token usage of one call or a sum of calls; ``calls`` counts adapter step calls."""

    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0
    calls: Count = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, total_tokens: int, calls: int) -> Usage:
        """A Usage from counts the caller knows to be valid (non-negative ints within ``MAX_COUNT``),
        without validation. This runs several times per step; pydantic's ``model_construct`` costs about ten
        times more than filling the instance the way it does (``__dict__`` and the fields-set marker)."""
        usage = cls.__new__(cls)
        _set(usage, "__dict__", {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
            "calls": calls,
        })  # fmt: skip
        _set(usage, "__pydantic_fields_set__", set(_ALL_FIELDS))
        _set(usage, "__pydantic_extra__", None)
        _set(usage, "__pydantic_private__", None)
        return usage

    @classmethod
    def saturated(cls, prompt_tokens: int, completion_tokens: int, total_tokens: int, calls: int) -> Usage:
        """A Usage from sums of valid counts (non-negative ints), each saturating at ``MAX_COUNT`` (a
        session's totals never break the limit); built without re-validation (it runs for every step)."""
        return cls.of(
            min(prompt_tokens, MAX_COUNT),
            min(completion_tokens, MAX_COUNT),
            min(total_tokens, MAX_COUNT),
            min(calls, MAX_COUNT),
        )

    def __add__(self, other: Usage) -> Usage:
        """The sum, each count saturating at ``MAX_COUNT`` (:meth:`saturated`)."""
        return Usage.saturated(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.calls + other.calls,
        )


_set = object.__setattr__
_ALL_FIELDS: Final = frozenset({"prompt_tokens", "completion_tokens", "total_tokens", "calls"})


class EventShape(TypedDict):
    # What pydantic-core checks: a non-empty string ``type``, other keys kept. A TypedDict is checked in Rust,
    # without calling back into Python (it runs for every event of every record the ingestor decodes).
    __pydantic_config__ = ConfigDict(extra="allow", title="Event")  # type: ignore[misc]
    type: Annotated[str, Field(min_length=1)]


Event = Annotated[JsonObject, GetPydanticSchema(lambda _source, handler: handler(EventShape))]
"""One adapter event: any JSON object with a non-empty string ``type`` (``tool_call``, ``sql``, ...).
Typed as a plain ``dict[str, Any]`` for adapter authors; validated as the shape above."""
