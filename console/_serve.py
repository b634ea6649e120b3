"""Running the console until asked to stop, with the URL it answers on made known."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import structlog
from aiohttp import web

from console._app import create_app
from console._settings import ConsoleSettings

_log = structlog.get_logger("console")


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host  # noqa: S104
    return f"http://{shown}:{port}/"


async def serve(settings: ConsoleSettings, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGINT / SIGTERM when none is given). Prints ``console: <url>``
    on stdout once it listens (port 0 becomes the port the system chose)."""
    stop = stop or _signal_event()
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=5.0)
        await site.start()
        server = site._server
        port = settings.port
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        url = url_of(settings.host, port)
        _log.info("console.listening", url=url, requeue_enabled=settings.requeue_enabled)
        sys.stdout.write(f"console: {url}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await runner.cleanup()


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, event.set)
    return event
