"""Calling user hooks by their own signatures, sync or async.

A hook's parameters are matched by *name* against the values on offer (e.g. ``payload``, ``prompt``,
``metadata``, ``context``, ``session_id``, ``reason``). If the primary value (the payload for a step, the
context for an open, the reason for a close) is not taken by name, the first positional parameter whose
name is not on offer receives it (so ``def on_step(self, query)`` works); failing that, a bare
``*args`` receives it. ``**kwargs`` receives every value on offer that no named parameter took. A
required parameter that cannot be filled is an :class:`AdapterConfigError` raised when the plan is made
(i.e. when the adapter is built).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.sessions._errors import AdapterConfigError

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@dataclass(frozen=True, slots=True)
class CallPlan:
    """How to call one hook: which offered values go positionally, which by keyword, and ``**kwargs``."""

    positional: tuple[str, ...]
    keywords: tuple[tuple[str, str], ...]
    var_keyword: bool

    def arguments(self, values: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        args = [values[key] for key in self.positional]
        kwargs = {param: values[key] for param, key in self.keywords}
        if self.var_keyword:
            used = {*self.positional, *(key for _, key in self.keywords)}
            for key, value in values.items():
                if key not in used:
                    kwargs.setdefault(key, value)
        return args, kwargs


def plan_call(
    fn: Callable[..., Any],
    *,
    hook: str,
    offered: tuple[str, ...],
    primary: tuple[str, ...],
    skip_first: bool = False,
) -> CallPlan:
    """Plan calls to ``fn``. ``primary`` lists the offered names that hold the primary value.

    ``skip_first`` drops the first parameter (``self`` of a function looked up on a class).
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: the primary value, positionally
        return CallPlan(positional=(primary[0],), keywords=(), var_keyword=False)
    if skip_first and params:
        params = params[1:]
    positional: list[str] = []
    keywords: list[tuple[str, str]] = []
    primary_taken = any(p.name in primary for p in params if p.kind not in _VARIADIC)
    var_keyword = False
    var_positional = False
    for param in params:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            var_positional = True
            continue
        key = param.name if param.name in offered else None
        if key is None and not primary_taken and param.kind in _POSITIONAL:
            key, primary_taken = primary[0], True
        if key is None:
            if param.default is inspect.Parameter.empty:
                names = ", ".join(offered)
                raise AdapterConfigError(
                    f"{hook} parameter {param.name!r} cannot be filled: name it one of {names}, "
                    "or give it a default"
                )
            if param.kind is inspect.Parameter.POSITIONAL_ONLY and any(
                p.kind is inspect.Parameter.POSITIONAL_ONLY for p in params[params.index(param) + 1 :]
            ):
                raise AdapterConfigError(f"{hook}: unsupported positional-only parameter {param.name!r}")
            continue
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(key)
        else:
            keywords.append((param.name, key))
    if var_positional and not var_keyword and not primary_taken and not keywords:
        positional.append(primary[0])  # ``def hook(*args)``: the primary value is its one argument
    return CallPlan(positional=tuple(positional), keywords=tuple(keywords), var_keyword=var_keyword)


async def call_hook(fn: Callable[..., Any], plan: CallPlan, values: Mapping[str, Any]) -> Any:
    """Call ``fn`` per ``plan``; sync hooks run inline, an awaitable result is awaited."""
    args, kwargs = plan.arguments(values)
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result
