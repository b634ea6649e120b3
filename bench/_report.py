"""Results, the machine they were measured on, and the markdown report (BENCHMARKS.md).

A benchmark returns :class:`Result` rows; ``render(results, machine)`` makes one table of them plus a
ratio for every row that names a ``baseline`` (another row's ``name``) and for any extra pairs given.
New rows (end-to-end runs, ingestor alone, peak RSS) are just more ``Result`` records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import aio_pika
import asyncpg

from atlas_common import BROKER_ERRORS

PACKAGES = ("aio-pika", "asyncpg", "celery", "kombu", "dramatiq", "pika")


@dataclass(frozen=True, slots=True)
class Result:
    """One row: ``value`` in ``unit`` (higher is better for rates), compared against ``baseline``."""

    name: str
    unit: str
    value: float
    baseline: str | None = None
    """The ``name`` of the row this one is divided by in the ratio column; None for no ratio."""
    notes: str = ""
    at_most: float | None = None
    """A target the row meets when ``value <= at_most``: its notes open with the verdict on the value
    shown (the median when runs are combined, not run 1's)."""
    at_least: float | None = None
    """A target the row meets when ``value >= at_least`` (a rate), with its verdict like ``at_most``'s."""
    at_least_ratio: float | None = None
    """A target the row meets when its ratio to ``baseline`` (the medians of the same run) is at least
    this, with its verdict like ``at_most``'s."""

    def verdict(self, versus: float | None = None) -> str:
        """``target <= 100 ms: met``, ``target >= 1x <baseline>: NOT met``, ... (empty without a target);
        ``versus``: this row's ratio to its baseline."""
        parts = []
        if self.at_most is not None:
            parts.append(f"target <= {self.at_most:g} {self.unit}: {_met(self.value <= self.at_most)}")
        if self.at_least is not None:
            parts.append(f"target >= {self.at_least:,g} {self.unit}: {_met(self.value >= self.at_least)}")
        if self.at_least_ratio is not None and versus is not None:
            met = _met(versus >= self.at_least_ratio)
            parts.append(f"target >= {self.at_least_ratio:g}x {self.baseline}: {met}")
        return "; ".join(parts)


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


@dataclass(frozen=True, slots=True)
class Machine:
    cores: int
    ram_gib: float
    cpu: str
    os: str
    python: str
    rabbitmq: str
    postgres: str
    packages: dict[str, str]
    date: str
    load_before: str
    load_after: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _cpu_model() -> str:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _rabbitmqctl_version() -> str | None:
    if shutil.which("rabbitmqctl") is None:
        return None
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "version"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


async def _rabbitmq_version(amqp_url: str) -> str:
    version = await asyncio.to_thread(_rabbitmqctl_version)
    if version:
        return f"{version} (rabbitmqctl version)"
    try:  # the server announces itself in connection.start
        connection = await aio_pika.connect(amqp_url, timeout=10)
    except BROKER_ERRORS:
        return "unknown"
    async with connection:
        properties = getattr(connection.transport, "server_properties", None) or {}
        announced = properties.get("version") if isinstance(properties, dict) else None
    return f"{announced!s} (AMQP server properties)" if announced else "unknown"


async def _postgres_version(database_url: str) -> str:
    try:
        conn = await asyncpg.connect(database_url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return "unknown"
    try:
        version: str = await conn.fetchval("SELECT version()")
    finally:
        await conn.close()
    return version


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


async def collect_machine(amqp_url: str, database_url: str) -> Machine:
    rabbitmq, postgres = await asyncio.gather(_rabbitmq_version(amqp_url), _postgres_version(database_url))
    return Machine(
        cores=os.cpu_count() or 0,
        ram_gib=_ram_gib(),
        cpu=_cpu_model(),
        os=f"{platform.system()} {platform.release()}",
        python=f"{platform.python_implementation()} {platform.python_version()}",
        rabbitmq=rabbitmq,
        postgres=postgres,
        packages=_package_versions(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load_before=load_average(),
    )


def combine_runs(runs: Sequence[Sequence[Result]]) -> list[Result]:
    """One row per name (first-seen order): the median of the runs; each run's value in the notes."""
    values: dict[str, list[float]] = {}
    first: dict[str, Result] = {}
    for run in runs:
        for result in run:
            first.setdefault(result.name, result)
            values.setdefault(result.name, []).append(result.value)
    combined = []
    for name, result in first.items():
        seen = values[name]
        if len(seen) == 1:
            combined.append(result)
            continue
        runs_text = ", ".join(_number(v) for v in seen)
        notes = f"median of {len(seen)} runs ({runs_text}); run 1: {result.notes}"
        combined.append(dataclasses.replace(result, value=statistics.median(seen), notes=notes))
    return combined


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def ratio(results: Sequence[Result], name: str, baseline: str) -> float | None:
    """``name``'s value over ``baseline``'s; None when either row is missing or the baseline is 0."""
    by_name = {r.name: r for r in results}
    row, base = by_name.get(name), by_name.get(baseline)
    if row is None or base is None or base.value == 0:
        return None
    return row.value / base.value


def ratio_lines(results: Sequence[Result], extra_ratios: Sequence[tuple[str, str]] = ()) -> list[str]:
    """``"<row> vs <baseline>: 1.80x"`` for every row with a baseline, then for each extra pair."""
    pairs = [(r.name, r.baseline) for r in results if r.baseline is not None]
    pairs += [p for p in extra_ratios if p not in pairs]
    lines = []
    for name, baseline in pairs:
        value = ratio(results, name, baseline)
        if value is not None:
            lines.append(f"{name} vs {baseline}: {value:.2f}x")
    return lines


def render_table(results: Sequence[Result]) -> str:
    rows = [
        "| benchmark | value | unit | vs baseline | notes |",
        "|---|---:|---|---|---|",
    ]
    for result in results:
        versus, value = "", None
        if result.baseline is not None:
            value = ratio(results, result.name, result.baseline)
            versus = (
                f"{value:.2f}x {result.baseline}" if value is not None else f"({result.baseline} missing)"
            )
        notes = "; ".join(part for part in (result.verdict(value), result.notes) if part)
        rows.append(
            f"| {_cell(result.name)} | {_number(result.value)} | {result.unit} | {_cell(versus)} "
            f"| {_cell(notes)} |"
        )
    return "\n".join(rows)


def render_machine(machine: Machine) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in machine.packages.items())
    lines = [
        f"- date: {machine.date}",
        f"- cores: {machine.cores} ({machine.cpu}), RAM {machine.ram_gib:.1f} GiB, {machine.os}",
        f"- Python: {machine.python}",
        f"- RabbitMQ: {machine.rabbitmq}",
        f"- PostgreSQL: {machine.postgres}",
        f"- packages: {packages}",
        f"- load average (1/5/15 min) before: {machine.load_before}; after: {machine.load_after or 'n/a'}",
    ]
    lines += [f"- {key}: {value}" for key, value in machine.extra.items()]
    return "\n".join(lines)


def render(
    results: Sequence[Result],
    machine: Machine,
    *,
    title: str = "atlas-pipeline benchmarks",
    method: str = "",
    extra_ratios: Sequence[tuple[str, str]] = (),
) -> str:
    """The whole report as markdown: results table, ratios, method, machine."""
    parts = [f"# {title}", "", render_table(results), ""]
    lines = ratio_lines(results, extra_ratios)
    if lines:
        parts += ["## Ratios", "", *(f"- {line}" for line in lines), ""]
    if method:
        parts += ["## Method", "", method.strip(), ""]
    parts += ["## Machine", "", render_machine(machine), ""]
    return "\n".join(parts)
