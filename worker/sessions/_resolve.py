"""Resolving ``"package.module:attribute"`` import strings, with errors that name the string."""

from __future__ import annotations

import importlib
import re
from typing import Any, Final

from worker.sessions._errors import AdapterConfigError

_DOTTED: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def resolve_import(spec: str) -> Any:
    """The object named by ``"package.module:attr"`` (``attr`` may be dotted, e.g. ``"mod:Outer.Inner"``).

    Raises :class:`AdapterConfigError` naming ``spec`` when it is malformed, the module cannot be
    imported (or fails while importing), or the attribute does not exist.
    """
    if not isinstance(spec, str):
        raise AdapterConfigError(f"adapter import string must be a str, got {type(spec).__name__}")
    module_name, sep, attr_path = spec.strip().partition(":")
    if not sep or not _DOTTED.match(module_name) or not _DOTTED.match(attr_path):
        raise AdapterConfigError(f"adapter import string {spec!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AdapterConfigError(
            f"adapter import string {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    except Exception as exc:  # the module itself is broken: report it against the import string
        raise AdapterConfigError(
            f"adapter import string {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AdapterConfigError(
                f"adapter import string {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    return obj
