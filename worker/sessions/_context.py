"""The immutable description of one adapter session, handed to ``open_session``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What an adapter knows when it opens a session (mirrors the Atlas SDK ``SessionContext``).

    ``session_id`` asks for a specific adapter session id; when ``None`` the adapter (or the stateless
    proxy) picks a fresh ``uuid4().hex``. ``extra`` carries anything else the caller wants to pass.
    The dataclass is frozen; the mappings inside it are the caller's and should be treated as read-only.
    """

    task_id: str
    execution_mode: str
    tool_metadata: Mapping[str, Any] | None = None
    user_context: Mapping[str, Any] | None = None
    session_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id:
            raise ValueError("SessionContext.task_id must be a non-empty string")
        if not isinstance(self.execution_mode, str) or not self.execution_mode:
            raise ValueError("SessionContext.execution_mode must be a non-empty string")
        if self.session_id is not None and (not isinstance(self.session_id, str) or not self.session_id):
            raise ValueError("SessionContext.session_id must be None or a non-empty string")
