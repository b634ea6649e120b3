"""The console's HTTP application: server-rendered pages (aiohttp + Jinja2), read-only against
PostgreSQL; the one write is requeueing dead letters, which is off unless ``requeue_enabled`` and asks
for a confirmation first.

Every value from a task, an output, a trace or an event reaches a page through Jinja2's autoescaping;
the Content-Security-Policy allows no inline script or style on top of that, so even a missed escape
could not run anything. The requeue form carries a token bound to this process and to the chosen ids,
and a request from another origin is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

import asyncpg
import jinja2
import structlog
from aiohttp import web

from atlas_common import BROKER_ERRORS, BrokerUnavailable, scrub_secrets
from console import _queries, _render
from console._overview import OverviewCache, read_overview
from console._settings import ConsoleSettings
from ingestor import fetch_line_map
from producer import ProducerError, Selection, list_dead_letters, requeue_dead_letters

_log = structlog.get_logger("console.app")
_HERE: Final = Path(__file__).parent
_SETTINGS: Final = web.AppKey("settings", ConsoleSettings)
_POOL: Final = web.AppKey("pool", asyncpg.Pool)
_CACHE: Final = web.AppKey("overview", OverviewCache)
_SECRET: Final = web.AppKey("secret", bytes)
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_DB_ERRORS: Final = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_DEAD_QUEUES: Final = ("tasks", "telemetry")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(settings: ConsoleSettings) -> web.Application:
    """The application; its PostgreSQL pool opens on startup and closes on cleanup."""
    app = web.Application(middlewares=[_headers, _errors])
    app[_SETTINGS] = settings
    app[_SECRET] = secrets.token_bytes(32)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    _render.install(env)
    app[_render.ENV] = env
    app.cleanup_ctx.append(_pool_ctx)
    app.router.add_get("/", overview)
    app.router.add_get("/overview/body", overview_body)
    app.router.add_get("/sessions", sessions)
    app.router.add_get("/sessions/{id:\\d{1,10}}", session)
    app.router.add_get("/sessions/{id:\\d{1,10}}/line.jsonl", session_line)
    app.router.add_get("/dead", dead_letters)
    app.router.add_post("/dead/confirm", dead_confirm)
    app.router.add_post("/dead/requeue", dead_requeue)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static", _HERE / "static", name="static", append_version=True)
    return app


async def _pool_ctx(app: web.Application) -> Any:
    settings = app[_SETTINGS]
    # min_size=0: the console starts (and shows what is wrong) while PostgreSQL is down. No statement
    # cache: the console may point at a transaction-mode pooler like the services.
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=4,
        timeout=settings.db_timeout_s,
        command_timeout=settings.db_timeout_s,
        statement_cache_size=0,
        init=_queries.init_connection,
    )
    app[_POOL] = pool
    cache = OverviewCache(lambda: read_overview(settings, pool), settings.refresh_s)
    app[_CACHE] = cache
    yield
    await cache.close()
    await pool.close()


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A database that is away is a page saying so (503), never a traceback."""
    try:
        return await handler(request)
    except _DB_ERRORS as exc:
        detail = scrub_secrets(str(exc) or type(exc).__name__, request.app[_SETTINGS].database_url)
        _log.warning("console.database_error", path=request.path, error=detail)
        return _page(request, "error.html", status=503, title="Database unavailable", detail=detail)


def _page(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    settings = request.app[_SETTINGS]
    static = request.app.router["static"]
    html = (
        request.app[_render.ENV]
        .get_template(template)
        .render(
            prefix=settings.prefix,
            path=request.path,
            requeue_enabled=settings.requeue_enabled,
            static=lambda name: str(static.url_for(filename=name)),
            **context,
        )
    )
    return web.Response(text=html, status=status, content_type="text/html")


async def overview(request: web.Request) -> web.Response:
    data = await request.app[_CACHE].get()
    return _page(request, "overview.html", o=data, refresh_s=request.app[_SETTINGS].refresh_s)


async def overview_body(request: web.Request) -> web.Response:
    """The overview's content alone: what the page's script swaps in every ``refresh_s``."""
    data = await request.app[_CACHE].get()
    return _page(request, "overview_body.html", o=data, refresh_s=request.app[_SETTINGS].refresh_s)


async def sessions(request: web.Request) -> web.Response:
    settings = request.app[_SETTINGS]
    flt = _queries.SessionFilter.from_query(request.query)
    before = _queries.parse_id(request.query.get("before"))
    after = _queries.parse_id(request.query.get("after")) if before is None else None
    async with request.app[_POOL].acquire() as conn:
        page = await _queries.list_sessions(
            conn, flt, page_size=settings.page_size, before=before, after=after
        )
        adapters = await _queries.adapters(conn)
    base = flt.query_string()
    older = f"?{urlencode({**base, 'before': page.oldest_id})}" if page.has_older else None
    newer = f"?{urlencode({**base, 'after': page.newest_id})}" if page.has_newer else None
    return _page(
        request,
        "sessions.html",
        page=page,
        flt=flt,
        raw=dict(request.query),
        adapters=adapters,
        statuses=_queries.STATUSES,
        older=older,
        newer=newer,
    )


async def session(request: web.Request) -> web.Response:
    session_id = int(request.match_info["id"])
    async with request.app[_POOL].acquire() as conn:
        detail = await _queries.session_detail(conn, session_id)
    if detail is None:
        return _page(request, "error.html", status=404, title="No such session", detail=f"id {session_id}")
    return _page(request, "session.html", d=detail, timeline=_render.timeline(detail.steps))


async def session_line(request: web.Request) -> web.Response:
    """The session's JSONL line, built by the ingestor's own function (byte-identical to the line in
    its file)."""
    session_id = int(request.match_info["id"])
    async with request.app[_POOL].acquire() as conn:
        lines = await fetch_line_map(conn, [session_id])
    line = lines.get(session_id)
    if line is None:
        raise web.HTTPNotFound(text=f"no session {session_id}\n")
    return web.Response(
        body=line,
        content_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="session-{session_id}.jsonl"'},
    )


async def dead_letters(request: web.Request) -> web.Response:
    settings = request.app[_SETTINGS]
    queue = request.query.get("queue", "tasks")
    if queue not in _DEAD_QUEUES:
        raise web.HTTPBadRequest(text="queue is tasks or telemetry\n")
    listing = None
    error = None
    try:
        listing = await list_dead_letters(
            settings.amqp_url,
            settings.topology(),
            queue,  # type: ignore[arg-type]
            limit=settings.dead_letter_limit,
            connect_timeout_s=settings.db_timeout_s,
        )
    except (BrokerUnavailable, ProducerError, *BROKER_ERRORS) as exc:
        error = scrub_secrets(str(exc) or type(exc).__name__, settings.amqp_url)
    return _page(
        request,
        "dead.html",
        queue=queue,
        queues=_DEAD_QUEUES,
        listing=listing,
        error=error,
        done=request.query.get("requeued"),
    )


def _token(secret: bytes, queue: str, ids: list[str]) -> str:
    message = "\n".join([queue, *sorted(ids)]).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


async def _requeue_form(request: web.Request) -> tuple[str, list[str]]:
    """The posted queue and message ids, after the checks every requeue request passes."""
    settings = request.app[_SETTINGS]
    if not settings.requeue_enabled:
        raise web.HTTPForbidden(text="requeue is off: start the console with CONSOLE_REQUEUE_ENABLED=true\n")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(text="cross-origin request refused\n")
    form = await request.post()
    queue = str(form.get("queue", ""))
    if queue not in _DEAD_QUEUES:
        raise web.HTTPBadRequest(text="queue is tasks or telemetry\n")
    ids = sorted({str(v) for v in form.getall("id", []) if str(v)})[:1000]
    if not ids:
        raise web.HTTPBadRequest(text="choose at least one dead letter\n")
    return queue, ids


async def dead_confirm(request: web.Request) -> web.Response:
    """Step one of a requeue: what would move, and a button that does it."""
    queue, ids = await _requeue_form(request)
    token = _token(request.app[_SECRET], queue, ids)
    return _page(request, "confirm.html", queue=queue, ids=ids, token=token)


async def dead_requeue(request: web.Request) -> web.StreamResponse:
    queue, ids = await _requeue_form(request)
    form = await request.post()
    if not hmac.compare_digest(str(form.get("token", "")), _token(request.app[_SECRET], queue, ids)):
        raise web.HTTPForbidden(text="confirmation token does not match: confirm again\n")
    settings = request.app[_SETTINGS]
    report = await requeue_dead_letters(
        settings.amqp_url,
        settings.topology(),
        Selection(ids=frozenset(ids)),
        queue,  # type: ignore[arg-type]
        connect_timeout_s=settings.db_timeout_s,
    )
    _log.info(
        "console.requeued",
        queue=queue,
        requeued=report.requeued,
        failed=report.failed,
        ids=report.requeued_ids,
    )
    raise web.HTTPSeeOther(f"/dead?{urlencode({'queue': queue, 'requeued': report.requeued})}")


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")
