"""Serving a Prometheus registry over HTTP, with a failed bind the operator can act on."""

from __future__ import annotations

import errno
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

DEFAULT_METRICS_HOST = "127.0.0.1"
"""Loopback: metrics say a lot about a deployment, so exposing them is a decision (a host setting)."""


class MetricsServerError(Exception):
    """The metrics server cannot start (port in use, address not on this host); the message says which."""


def serve_metrics(registry: CollectorRegistry, port: int, host: str = DEFAULT_METRICS_HOST) -> WSGIServer:
    """Serve ``registry`` on ``host:port`` from a daemon thread; the server is returned for shutdown."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise MetricsServerError(f"cannot serve metrics on {where}: {_why(exc)}") from None
    return server


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use by another process; choose another port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this host's"
    return exc.strerror or str(exc)
