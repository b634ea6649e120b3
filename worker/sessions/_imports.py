"""Import strings -> adapters: ``load_adapter``."""

from __future__ import annotations

import inspect
from typing import Any

from worker.sessions._adapter import AgentAdapter
from worker.sessions._errors import AdapterConfigError
from worker.sessions._python_adapter import PythonAdapter
from worker.sessions._resolve import resolve_import


def load_adapter(spec: Any, *, name: str | None = None) -> AgentAdapter:
    """Resolve ``spec`` (``"module:attr"`` or an object) to an adapter.

    An :class:`AgentAdapter` instance is returned as is (``name`` is not applied to it); an
    ``AgentAdapter`` subclass is instantiated without arguments (then named ``name`` if given); anything
    else is wrapped in :class:`PythonAdapter`. Errors are :class:`AdapterConfigError` naming ``spec``.
    """
    target = resolve_import(spec) if isinstance(spec, str) else spec
    if isinstance(target, AgentAdapter):
        return target
    if inspect.isclass(target) and issubclass(target, AgentAdapter):
        try:
            adapter = target()
        except Exception as exc:
            raise AdapterConfigError(
                f"cannot instantiate adapter {spec!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if name:
            adapter.name = name
        return adapter
    return PythonAdapter(target, name=name)
