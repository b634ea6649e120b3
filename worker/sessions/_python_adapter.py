"""``PythonAdapter``: any Python object, class, function or ``"module:attr"`` string as an adapter.

* A target with an ``on_step`` hook is **stateful** (``supports_sessions`` is True); ``on_open`` and
  ``on_close`` are optional. A *class* target gets one new instance per session (``target()``), so state
  never leaks between sessions. An *instance* target has its hooks called on that one object for every
  session: any state it keeps is then shared by all sessions (and concurrent runs), by design.
* Otherwise the target is **stateless**: an object (or a class, instantiated once) with ``ainvoke`` or
  ``invoke``, or a plain callable. Sessions are :class:`StatelessSession` proxies.
* Hooks may be sync or async; sync hooks run inline on the event loop (keep them short or make them
  async). Arguments are passed by the hook's own parameter names (see :mod:`worker.sessions._hooks`):

  ======== ============================================================================ =========
  hook     names on offer                                                               primary
  ======== ============================================================================ =========
  on_open  context, session_id, metadata (the session's, mutable), task_id,             context
           execution_mode, user_context, tool_metadata
  on_step  payload, prompt (same value), metadata (the call's), context, session_id     payload
  on_close reason, context, session_id, metadata (the session's)                        reason
  callable prompt, payload (same value), metadata, session_id (stateless targets)       prompt
  ======== ============================================================================ =========

* A mapping returned by ``on_open`` is merged into ``session.metadata``; one returned by ``on_close`` into
  the close metadata (any other non-None value is stored there as ``result``). ``on_step`` results are
  normalised by :func:`worker.sessions.normalize_outcome`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from worker.sessions._adapter import AgentAdapter, invoke_once
from worker.sessions._context import SessionContext
from worker.sessions._errors import AdapterConfigError
from worker.sessions._hooks import CallPlan, call_hook, plan_call
from worker.sessions._json import to_json_object, to_jsonable
from worker.sessions._resolve import resolve_import
from worker.sessions._session import AgentSession, BaseSession, new_session_id

_OFFERED: Final = {
    "on_open": (
        "context",
        "session_id",
        "metadata",
        "task_id",
        "execution_mode",
        "user_context",
        "tool_metadata",
    ),
    "on_step": ("payload", "prompt", "metadata", "context", "session_id"),
    "on_close": ("reason", "context", "session_id", "metadata"),
    "call": ("prompt", "payload", "metadata", "session_id"),
}
_PRIMARY: Final = {
    "on_open": ("context",),
    "on_step": ("payload", "prompt"),
    "on_close": ("reason",),
    "call": ("prompt", "payload"),
}
_BAD_NAME_CHARS: Final = re.compile(r"[^A-Za-z0-9_.:@/-]+")


def _default_name(target: Any) -> str:
    declared = getattr(target, "name", None)
    raw = declared if isinstance(declared, str) and declared else None
    if raw is None:
        raw = getattr(target, "__name__", None) or type(target).__name__
    cleaned = _BAD_NAME_CHARS.sub("_", str(raw)).lstrip("_.:@/-")
    return cleaned or "python"


def _hook_plan(target: Any, hook: str, display: str) -> CallPlan | None:
    attr = getattr(target, hook, None)
    if attr is None:
        return None
    if not callable(attr):
        raise AdapterConfigError(f"{display}.{hook} is not callable")
    skip_self = inspect.isclass(target) and inspect.isfunction(inspect.getattr_static(target, hook))
    return plan_call(
        attr, hook=f"{display}.{hook}", offered=_OFFERED[hook], primary=_PRIMARY[hook], skip_first=skip_self
    )


class _PythonSession(BaseSession):
    def __init__(self, adapter: PythonAdapter, instance: Any, context: SessionContext) -> None:
        super().__init__(
            new_session_id(context),
            {"adapter": adapter.name, "stateful": True, "instance": adapter.instance_mode},
        )
        self._adapter = adapter
        self._instance = instance
        self.context = context

    async def _step(self, payload: Any, metadata: dict[str, Any]) -> Any:
        values = {
            "payload": payload,
            "prompt": payload,
            "metadata": metadata,
            "context": self.context,
            "session_id": self.session_id,
        }
        return await self._adapter.call_hook(self._instance, "on_step", values)

    async def _close(self, reason: str | None) -> Mapping[str, Any] | None:
        values = {
            "reason": reason,
            "context": self.context,
            "session_id": self.session_id,
            "metadata": self.metadata,
        }
        result = await self._adapter.call_hook(self._instance, "on_close", values)
        if result is None or isinstance(result, Mapping):
            return result
        return {"result": to_jsonable(result)}


class PythonAdapter(AgentAdapter):
    """Wrap ``target`` (object, class, function, or ``"module:attr"``) as an :class:`AgentAdapter`.

    ``name`` defaults to the target's ``name`` attribute (if a non-empty str), else its ``__name__``,
    else its type name (characters outside ``[A-Za-z0-9_.:@/-]`` replaced by ``_``).
    """

    def __init__(self, target: object, *, name: str | None = None) -> None:
        self.import_path = target if isinstance(target, str) else None
        obj = resolve_import(target) if isinstance(target, str) else target
        display = self.import_path or getattr(obj, "__qualname__", None) or type(obj).__name__
        self.target: Any = obj
        self.name = name or _default_name(obj)
        self._plans: dict[str, CallPlan] = {}
        self._call: Callable[..., Any] | None = None
        if getattr(obj, "on_step", None) is not None:
            for hook in ("on_open", "on_step", "on_close"):
                plan = _hook_plan(obj, hook, display)
                if plan is not None:
                    self._plans[hook] = plan
            self.supports_sessions = True
            self.instance_mode = "per_session" if inspect.isclass(obj) else "shared"
            return
        for hook in ("on_open", "on_close"):
            if getattr(obj, hook, None) is not None:
                raise AdapterConfigError(f"{display} has {hook} but no on_step hook; on_step is required")
        self.supports_sessions = False
        self.instance_mode = "stateless"
        self._call = self._stateless_entry(obj, display)
        self._plans["call"] = plan_call(
            self._call, hook=display, offered=_OFFERED["call"], primary=_PRIMARY["call"]
        )

    @staticmethod
    def _stateless_entry(obj: Any, display: str) -> Callable[..., Any]:
        has_method = any(getattr(obj, m, None) is not None for m in ("ainvoke", "invoke"))
        if inspect.isclass(obj):
            if not has_method:
                raise AdapterConfigError(f"class {display} has neither an on_step hook nor ainvoke/invoke")
            try:
                obj = obj()
            except Exception as exc:
                detail = f"{type(exc).__name__}: {exc}"
                raise AdapterConfigError(f"cannot instantiate {display}: {detail}") from exc
        for method in ("ainvoke", "invoke"):
            entry = getattr(obj, method, None)
            if entry is not None:
                if not callable(entry):
                    raise AdapterConfigError(f"{display}.{method} is not callable")
                return entry  # type: ignore[no-any-return]
        if callable(obj):
            return obj  # type: ignore[no-any-return]
        raise AdapterConfigError(f"{display} is not callable and has no on_step, ainvoke or invoke")

    async def call_hook(self, instance: Any, hook: str, values: Mapping[str, Any]) -> Any:
        """Call ``instance.<hook>`` with ``values`` (``None`` if the optional hook is absent)."""
        plan = self._plans.get(hook)
        if plan is None:
            return None
        return await call_hook(getattr(instance, hook), plan, values)

    async def ainvoke(self, prompt: Any, metadata: Mapping[str, Any] | None = None) -> Any:
        """Stateless targets: call them. Stateful targets: a one-shot session (open, step, close)."""
        if self._call is None:
            return await invoke_once(self, prompt, metadata)
        values = {
            "prompt": prompt,
            "payload": prompt,
            "metadata": dict(metadata or {}),
            "session_id": (metadata or {}).get("adapter_session_id"),
        }
        return await call_hook(self._call, self._plans["call"], values)

    async def open_session(self, context: SessionContext) -> AgentSession:
        if not self.supports_sessions:
            return await super().open_session(context)
        instance = self.target() if self.instance_mode == "per_session" else self.target
        session = _PythonSession(self, instance, context)
        values = {
            "context": context,
            "session_id": session.session_id,
            "metadata": session.metadata,
            "task_id": context.task_id,
            "execution_mode": context.execution_mode,
            "user_context": context.user_context,
            "tool_metadata": context.tool_metadata,
        }
        opened = await self.call_hook(instance, "on_open", values)
        if isinstance(opened, Mapping):
            session.metadata.update(to_json_object(opened))
        return session
