"""The one error a decoder raises."""

from __future__ import annotations

from typing import Literal

DecodeReason = Literal["too_large", "not_json", "not_an_object", "unsupported_version", "invalid"]


class DecodeError(ValueError):
    """Bytes that are not a valid message. ``reason`` is a short code; ``str(err)`` says what is wrong.

    Raised instead of returning a half-built object; callers dead-letter the body with ``str(err)``.
    """

    def __init__(self, reason: DecodeReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DecodeReason = reason
        self.detail = detail
