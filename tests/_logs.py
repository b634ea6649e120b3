"""Capturing what a module logs through structlog, for tests that check a log line (or its absence)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog


@contextmanager
def captured(*module_names: str) -> Iterator[list[MutableMapping[str, Any]]]:
    """The entries (event name and fields) that the modules' ``log`` loggers emit inside the block.

    Each module's ``log`` is swapped for a fresh logger for the block: ``configure_logging`` (which some
    tests call in this process) caches a logger on first use, and a cached one would bypass
    ``capture_logs``.
    """
    modules = [importlib.import_module(name) for name in module_names]
    saved = [vars(module)["log"] for module in modules]
    with structlog.testing.capture_logs() as entries:
        try:
            for module in modules:
                vars(module)["log"] = structlog.get_logger(module.__name__)
            yield entries
        finally:
            for module, log in zip(modules, saved, strict=True):
                vars(module)["log"] = log
