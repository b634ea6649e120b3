"""structlog set-up shared by every process: JSON in production, readable in a terminal.

structlog's own loggers render straight to stderr; this project's modules all log that way
(``structlog.get_logger``). Everything that logs through stdlib ``logging`` (aiormq, aio-pika, asyncpg,
asyncio and the other libraries) goes through one root handler whose
:class:`structlog.stdlib.ProcessorFormatter` renders with the same renderer, so with JSON every stderr
line is one object: ``event``, ``level``, ``logger``, ``timestamp``, the bound contextvars (``task_id``,
``adapter_session_id``), and a traceback in ``exception``.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]


class _StructlogStderrHandler(logging.Handler):
    """Writes formatted records through a structlog PrintLogger on the same stream, so a stdlib line and a
    structlog line share one write lock and can never interleave."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._out = structlog.PrintLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:  # noqa: BLE001 (logging must never raise; stdlib reports it)
            self.handleError(record)


def _is_plain_stderr_handler(handler: logging.Handler) -> bool:
    """A ``logging.basicConfig``-style handler writing plain text to stderr (it would break the JSON)."""
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__)


def configure_logging(*, level: str = "INFO", log_format: LogFormat = "auto") -> None:
    """Configure structlog and stdlib logging for the process. ``auto`` is console on a TTY, else JSON.

    Context bound with ``structlog.contextvars.bound_contextvars`` (``adapter_session_id``, ``task_id``)
    appears on every line logged inside that block, stdlib lines included. Calling it again replaces the
    earlier set-up.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _StructlogStderrHandler(sys.stderr)
    handler.set_name("atlas-structlog")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "atlas-structlog" or _is_plain_stderr_handler(old):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    # Libraries (aio-pika, asyncpg) log through stdlib logging: keep their warnings, drop their chatter.
    root.setLevel(max(numeric, logging.WARNING))
