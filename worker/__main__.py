"""``python -m worker`` / ``atlas-worker``: consume tasks and run them in adapter sessions."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from atlas_common import configure_logging, load_settings, run
from worker.runtime import (
    AdapterRegistry,
    BrokerUnavailable,
    LedgerUnavailable,
    SchemaBehind,
    Worker,
    WorkerMetrics,
    WorkerSettings,
)
from worker.sessions import WorkerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run atlas-pipeline tasks.")
    parser.add_argument("--concurrency", type=int, help="tasks run at once; the prefetch (default 16)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="NAME=MODULE:ATTR",
        help="an adapter tasks may name (repeatable; the first is the default; the demo adapter if none)",
    )
    parser.add_argument("--amqp-url", help="RabbitMQ URL (default: $AMQP_URL)")
    parser.add_argument("--database-url", help="PostgreSQL URL of the task ledger (default: $DATABASE_URL)")
    parser.add_argument("--prefix", help="topology name prefix (default: $ATLAS_PREFIX or 'atlas')")
    parser.add_argument(
        "--shutdown-grace-s", type=float, help="time in-flight tasks get to finish on SIGTERM"
    )
    parser.add_argument("--demo-latency-s", type=float, help="simulated per-call latency of the demo adapter")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    return parser


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    overrides = {
        "concurrency": args.concurrency,
        "adapters": tuple(args.adapter) if args.adapter else None,
        "amqp_url": args.amqp_url,
        "database_url": args.database_url,
        "prefix": args.prefix,
        "shutdown_grace_s": args.shutdown_grace_s,
        "demo_latency_s": args.demo_latency_s,
        "metrics_port": args.metrics_port,
    }
    return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})


async def _serve(settings: WorkerSettings, registry: AdapterRegistry) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = WorkerMetrics()
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port, settings.metrics_host)
    try:
        await Worker(settings, registry, metrics=metrics).run(stop)
    finally:
        await registry.aclose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(lambda: settings_from(args))
    if settings is None:
        return 2
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    try:
        registry = AdapterRegistry.from_specs(settings.adapters, demo_latency_s=settings.demo_latency_s)
        run(_serve(settings, registry))
    except (BrokerUnavailable, SchemaBehind, LedgerUnavailable) as exc:  # a service missing or behind
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:  # a configuration it cannot run with: an adapter spec, the metrics port
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
