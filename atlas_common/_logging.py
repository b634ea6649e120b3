"""structlog set-up shared by every process: JSON in production, readable in a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure_logging(*, level: str = "INFO", log_format: LogFormat = "auto") -> None:
    """Configure structlog once per process. ``auto`` is console on a TTY and JSON otherwise.

    Context bound with ``structlog.contextvars.bound_contextvars`` (``adapter_session_id``, ``task_id``)
    appears on every line logged inside that block.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (aio-pika, asyncpg) log through stdlib logging: keep their warnings, drop their chatter.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
