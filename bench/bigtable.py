"""``python -m bench.bigtable [--rows 50000000]``: does the ingestor stay flat as ``step_results`` grows?

In a scratch database ``bigtable_<hex>`` (every migration applied; dropped at the end unless ``--keep``)
on the server of ``$DATABASE_URL``:

1. A recent day: sessions that completed over the last 20 hours, at the rate the history has (the
   windows the services look at, 24 h of ledger, ``export --since`` a day, hold the same data at every
   level).
2. Fill levels (default 0, 20 %, 50 % and 100 % of ``--rows`` step rows): history older than two days,
   spread over ``--history-days`` (90), filled server-side (``INSERT ... SELECT FROM generate_series``,
   chunks of ~3 M step rows, see :mod:`bench._bigfill`), then ``VACUUM (ANALYZE)`` (what autovacuum does
   on a live table).
3. At each level (:mod:`bench._bigmeasure`): the ingestor's batch transaction on fresh sessions (ms per
   batch, records/s, ms per statement), the queries of its sweeps, recovery, ``export``, ``producer
   audit`` / ``status`` and ``ingestor prune`` (ms, the generic plan's ms, the plan), and table and index
   sizes.
4. At the end, a real ``ingestor prune`` of the oldest ``--prune-days`` of history (rate, batch time).

``--keep`` keeps the database; ``--again NAME`` measures a kept one once more, as it is (after a fix).

Prints a markdown report (stdout and ``--out``, default ``var/bench/bigtable-<rows>.md``) and writes
every plan next to it (``...-plans.txt``). Progress lines go to stderr. The fill connection sets
``session_replication_role = replica`` (no foreign-key triggers: the fill is consistent by construction);
the measured connections are ordinary ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import asyncpg

from atlas_common import configure_logging
from bench._bigfill import PERIOD, Span, fill_chunk, sessions_for_steps, steps_of
from bench._bigmeasure import (
    QUERIES,
    QueryResult,
    Sizes,
    WriteStats,
    context,
    measure_queries,
    measure_sizes,
    measure_writes,
)
from bench._report import _cpu_model, _ram_gib, load_average
from bench._services import ROOT
from ingestor import IngestorSettings, Pruned, prune_sessions
from migrations import apply_migrations

DAY: Final = 86_400.0
RECENT_S: Final = 20 * 3600.0
HISTORY_GAP_S: Final = 2 * DAY
CHUNK_SESSIONS: Final = 516_000  # ~3 M step rows; a multiple of PERIOD


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _count(text: str) -> int:
    """``50000000``, ``50_000_000``, ``50M``, ``2.5M``, ``300k``."""
    text = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    return round(float(text[:-1] if scale > 1 else text) * scale)


def _gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GB"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


@dataclass
class Level:
    target: int
    steps: int = 0
    sessions: int = 0
    fill_s: float = 0.0
    vacuum_s: float = 0.0
    writes: WriteStats | None = None
    queries: dict[str, QueryResult] = field(default_factory=dict)
    sizes: Sizes | None = None


@dataclass
class Plan:
    """The time axis: history sessions 1..H, then the recent day H+1..H+R, one every ``dt`` seconds."""

    history: int
    recent: int
    dt: float
    now: float

    @classmethod
    def make(cls, rows: int, history_days: float, now: float) -> Plan:
        history = sessions_for_steps(rows)
        dt = history_days * DAY / max(history, 1)
        recent = max(3 * PERIOD * 20, round(RECENT_S / dt / PERIOD) * PERIOD)
        return cls(history, recent, dt, now)

    def history_span(self, first: int, last: int) -> Span:
        t0 = self.now - HISTORY_GAP_S - self.history * self.dt
        return Span(first, last, t0, 1, self.dt)

    def recent_span(self) -> Span:
        dt = RECENT_S / self.recent
        t0 = self.now - 600 - RECENT_S
        return Span(self.history + 1, self.history + self.recent, t0, self.history + 1, dt)

    def history_start(self) -> datetime:
        return datetime.fromtimestamp(self.history_span(1, 1).t0, UTC)


_SHOWN: Final = (
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "random_page_cost",
    "max_wal_size",
    "jit",
)


async def _server(conn: asyncpg.Connection) -> str:
    version = str(await conn.fetchval("SHOW server_version")).split()[0]
    settings = [f"{name} {await conn.fetchval(f'SHOW {name}')}" for name in _SHOWN]
    return f"PostgreSQL {version} ({', '.join(settings)}; as found, not tuned)"


def _free_bytes(data_directory: str) -> int:
    path = data_directory if Path(data_directory).is_dir() else "/"
    return shutil.disk_usage(path).free


async def _fill(
    conn: asyncpg.Connection, spans: list[Span], *, data_dir: str, min_free: int
) -> tuple[int, int]:
    sessions = steps = 0
    for span in spans:
        free = _free_bytes(data_dir)
        if free < min_free:
            raise SystemExit(f"bigtable: only {_gb(free)} free on the database's disk; stopping the fill")
        done = await fill_chunk(conn, span)
        sessions += done.sessions
        steps += done.steps
        _say(
            f"fill: sessions {span.first:,}..{span.last:,}: {done.steps:,} step rows in {done.seconds:.1f}s "
            f"({done.steps / done.seconds:,.0f} step rows/s), {_gb(_free_bytes(data_dir))} free"
        )
    return sessions, steps


def _chunks(first: int, last: int, plan: Plan) -> list[Span]:
    return [
        plan.history_span(start, min(last, start + CHUNK_SESSIONS - 1))
        for start in range(first, last + 1, CHUNK_SESSIONS)
    ]


async def _vacuum(conn: asyncpg.Connection) -> float:
    started = time.monotonic()
    for table in ("sessions", "step_results", "plans", "task_ledger", "jsonl_files"):
        await conn.execute(f"VACUUM (ANALYZE) {table}")
    return time.monotonic() - started


async def _measure(
    level: Level, url: str, conn: asyncpg.Connection, plan: Plan, args: argparse.Namespace
) -> None:
    _say(f"measure: writes at {level.steps:,} step rows")
    level.writes = await measure_writes(
        url, level=level.target, batches=args.batches, sessions_per_batch=args.sessions_per_batch
    )
    _say("measure: queries")
    oldest = await conn.fetchval("SELECT min(completed_at) FROM sessions")
    ctx = await context(
        conn,
        recent_first=plan.history + 1,
        recent_count=plan.recent,
        prune_before=oldest + timedelta(days=args.prune_days or 1),
    )
    level.queries = await measure_queries(url, ctx)
    level.sizes = await measure_sizes(conn)


@dataclass
class Scratch:
    admin: str
    name: str
    data_dir: str = ""

    @property
    def url(self) -> str:
        return f"{self.admin.rpartition('/')[0]}/{self.name}"

    async def create(self, args: argparse.Namespace) -> None:
        conn = await asyncpg.connect(self.admin)
        try:
            await conn.execute(f'CREATE DATABASE "{self.name}"')
            self.data_dir = str(await conn.fetchval("SHOW data_directory"))
            args.pg = await _server(conn)
        finally:
            await conn.close()
        _say(f"bigtable: scratch database {self.name}")

    async def drop(self) -> None:
        conn = await asyncpg.connect(self.admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()


async def _levels(
    conn: asyncpg.Connection, scratch: Scratch, plan: Plan, args: argparse.Namespace
) -> list[Level]:
    """The recent day, then each level: fill, vacuum, measure; the report is rewritten after each."""
    await conn.execute("SET TIME ZONE 'UTC'")
    await conn.execute("SET session_replication_role = replica")
    await conn.execute("SET maintenance_work_mem = '512MB'")
    fill_args = {"data_dir": scratch.data_dir, "min_free": args.min_free}
    started = time.monotonic()
    sessions, steps = await _fill(conn, [plan.recent_span()], **fill_args)
    recent_s = time.monotonic() - started
    await conn.execute("SELECT setval('sessions_id_seq', $1)", plan.history + plan.recent)
    levels: list[Level] = []
    filled = 0
    for target in args.levels:
        level = Level(target)
        last = min(plan.history, sessions_for_steps(target))
        started = time.monotonic()
        more = await _fill(conn, _chunks(filled + 1, last, plan), **fill_args)
        level.fill_s = time.monotonic() - started + (recent_s if not levels else 0.0)
        filled = max(filled, last)
        sessions, steps = sessions + more[0], steps + more[1]
        level.vacuum_s = await _vacuum(conn)
        level.sessions, level.steps = sessions, steps
        _say(f"level {target:,}: {steps:,} step rows, {sessions:,} sessions; fill {level.fill_s:.0f}s")
        await _measure(level, scratch.url, conn, plan, args)
        levels.append(level)
        _write(args, report(levels, args, None, plan), levels)
    return levels


async def again(args: argparse.Namespace) -> list[Level]:
    """``--again NAME``: measure a database an earlier ``--keep`` run filled once more (after a fix), as it
    is: no fill, no prune, kept."""
    scratch = Scratch(_admin_url(), args.again)
    conn = await asyncpg.connect(scratch.url, command_timeout=None)
    try:
        args.pg = await _server(conn)
        await apply_migrations(scratch.url)
        plan = Plan.make(args.rows, args.history_days, time.time())
        level = Level(args.rows)
        level.vacuum_s = await _vacuum(conn)
        level.steps = int(await conn.fetchval("SELECT count(*) FROM step_results"))
        level.sessions = int(await conn.fetchval("SELECT count(*) FROM sessions"))
        await _measure(level, scratch.url, conn, plan, args)
    finally:
        await conn.close()
    text = report([level], args, None, plan)
    print(text)
    _write(args, text, [level])
    return [level]


def _admin_url() -> str:
    return os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def run(args: argparse.Namespace) -> list[Level]:
    scratch = Scratch(_admin_url(), f"bigtable_{uuid.uuid4().hex[:10]}")
    await scratch.create(args)
    try:
        await apply_migrations(scratch.url)
        plan = Plan.make(args.rows, args.history_days, time.time())
        conn = await asyncpg.connect(scratch.url, command_timeout=None)
        try:
            levels = await _levels(conn, scratch, plan, args)
        finally:
            await conn.close()
        pruned = None
        if args.prune_days > 0:
            before = plan.history_start() + timedelta(days=args.prune_days)
            _say(f"prune: --before {before.isoformat()}")
            settings = IngestorSettings(database_url=scratch.url, log_level="WARNING")
            pruned = await prune_sessions(settings, before=before, batch=10_000, progress=False)
    finally:
        if args.keep:
            _say(f'bigtable: kept {scratch.name} ({scratch.url}); DROP DATABASE "{scratch.name}" when done')
        else:
            await scratch.drop()
    text = report(levels, args, pruned, plan)
    print(text)
    _write(args, text, levels)
    return levels


def _write(args: argparse.Namespace, text: str, levels: list[Level]) -> None:
    """The report and the plans, written again after every level (a long run leaves its partial results)."""
    out: Path = args.out or ROOT / "var" / "bench" / f"bigtable-{args.rows}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    plans = out.with_name(out.stem + "-plans.txt")
    plans.write_text(_plans(levels))
    _say(f"bigtable: wrote {out} and {plans}")


def _plans(levels: list[Level]) -> str:
    parts = []
    for level in levels:
        for name, result in level.queries.items():
            parts.append(f"=== {name} at {level.steps:,} step rows\n{result.plan}\n")
    return "\n".join(parts)


_STATEMENTS: Final = (
    "BEGIN_BATCH",
    "UPSERT_SESSIONS",
    "EXISTING_SESSIONS",
    "COPY_STEPS",
    "UPDATE_SESSIONS",
    "INSERT_PLANS",
    "ABANDON",
    "FILE_ASSIGNED",
    "COMMIT",
)


def _writes_table(levels: list[Level]) -> list[str]:
    lines = [
        "| step rows | whole batch: ms (p90) | records/s | step rows/s | split A: ms | split B: ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        w = level.writes
        if w is None:
            continue
        whole = w.median("whole")
        records, steps = w.records["whole"] / whole * 1000, w.steps["whole"] / whole * 1000
        lines.append(
            f"| {level.steps:,} | {_ms(whole)} ({_ms(w.p90('whole'))}) | {records:,.0f} | {steps:,.0f} "
            f"| {_ms(w.median('split A'))} | {_ms(w.median('split B'))} |"
        )
    lines += ["", "Per statement, median ms (whole / split B):", ""]
    lines.append("| statement | " + " | ".join(f"{lv.steps:,}" for lv in levels) + " |")
    lines.append("|---|" + "---:|" * len(levels))
    for name in _STATEMENTS:
        cells = []
        for level in levels:
            w = level.writes
            if w is None:
                cells.append("-")
                continue
            a = w.statement_ms.get("whole", {}).get(name)
            b = w.statement_ms.get("split B", {}).get(name)
            cells.append(" / ".join(_ms(sorted(x)[len(x) // 2]) if x else "-" for x in (a, b)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _queries_table(levels: list[Level]) -> list[str]:
    lines = [
        "| query | run by | " + " | ".join(f"{lv.steps:,}" for lv in levels) + " | plan at the last level |",
        "|---|---|" + "---:|" * len(levels) + "---|",
    ]
    last = levels[-1]
    for query in QUERIES:
        cells = []
        for level in levels:
            r = level.queries.get(query.name)
            cells.append(f"{_ms(r.ms)} ({_ms(r.generic_ms)})" if r else "-")
        r = last.queries.get(query.name)
        plan = ""
        if r is not None:
            plan = "; ".join(r.scans) or "no table scan"
            if r.seq_scans:
                plan = f"**seq scan of {', '.join(r.seq_scans)}**; " + plan
            plan += f"; buffers hit {r.hit:,} read {r.read:,}"
        name = query.name + (" (whole history by design)" if query.grows else "")
        lines.append(f"| {name} | {query.who} | " + " | ".join(cells) + f" | {plan} |")
    return lines


def _sizes_table(levels: list[Level]) -> list[str]:
    lines = [
        "| step rows | step_results heap | its indexes | sessions (all) | plans | task_ledger | database |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        s = level.sizes
        if s is None:
            continue
        t = s.tables
        steps = t["step_results"]
        others = " | ".join(_gb(t[name]["total"]) for name in ("sessions", "plans", "task_ledger"))
        lines.append(
            f"| {level.steps:,} | {_gb(steps['heap'])} | {_gb(steps['indexes'])} | {others} "
            f"| {_gb(s.database)} |"
        )
    if levels and levels[-1].sizes is not None:
        lines += ["", "Indexes at the last level:", ""]
        lines += ["| index | size |", "|---|---:|"]
        lines += [f"| {name} | {_gb(size)} |" for name, size in levels[-1].sizes.indexes.items()]
    return lines


def _header(args: argparse.Namespace, plan: Plan) -> str:
    per_session = sum(steps_of(i) for i in range(1, PERIOD + 1)) / PERIOD
    return (
        f"`python -m bench.bigtable --rows {args.rows}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"{os.cpu_count()} cores ({_cpu_model()}), {_ram_gib():.0f} GiB RAM, "
        f"load {load_average()} at the end; {args.pg}. History: {plan.history:,} sessions over "
        f"{args.history_days:g} days ending 2 days ago; recent day: {plan.recent:,} sessions over the last "
        f"20 h; {per_session:.1f} steps a session on average."
    )


def _fill_table(levels: list[Level]) -> list[str]:
    lines = [
        "| level | step rows | sessions | fill | step rows/s | vacuum analyze |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    previous = 0
    for level in levels:
        added = level.steps - previous
        rate = f"{added / level.fill_s:,.0f}" if level.fill_s > 0 and added > 0 else "-"
        lines.append(
            f"| {level.target:,} | {level.steps:,} | {level.sessions:,} | {level.fill_s:,.0f} s | {rate} "
            f"| {level.vacuum_s:,.0f} s |"
        )
        previous = level.steps
    fill_min = sum(lv.fill_s for lv in levels) / 60
    vacuum_min = sum(lv.vacuum_s for lv in levels) / 60
    lines += ["", f"Fill time in all: {fill_min:.1f} min (plus {vacuum_min:.1f} min of VACUUM ANALYZE)."]
    return lines


def _prune_text(pruned: Pruned, args: argparse.Namespace) -> list[str]:
    per_batch = pruned.seconds / pruned.batches * 1000 if pruned.batches else 0.0
    seconds = max(pruned.seconds, 1e-9)
    text = (
        f"`ingestor prune --batch 10000` of the oldest {args.prune_days:g} day(s) of history: "
        f"{pruned.sessions:,} sessions and {pruned.steps:,} step rows in {pruned.seconds:.1f} s, "
        f"{pruned.batches} batches ({per_batch:,.0f} ms a batch, "
        f"{pruned.sessions / seconds:,.0f} sessions/s, {pruned.steps / seconds:,.0f} step rows/s)."
    )
    return ["## Prune", "", text, ""]


def report(levels: list[Level], args: argparse.Namespace, pruned: Pruned | None, plan: Plan) -> str:
    shapes = (
        f"{args.sessions_per_batch} sessions a batch: whole = 7 records each ({args.batches} batches), "
        f"split = A (opened + 2 steps) then B (3 steps + close) ({args.batches // 2} pairs); median."
    )
    lines = [
        f"# step_results at {args.rows:,} rows: the ingestor's writes and queries by fill level",
        "",
        _header(args, plan),
        "",
        "## Fill",
        "",
        *_fill_table(levels),
        "",
        "## (a) The ingestor's batch transaction (`ingestor._write.write_batch`, committed)",
        "",
        shapes,
        "",
        *_writes_table(levels),
        "",
        "## (b) Queries outside the batch: ms, median of 3 (in brackets: under the generic plan)",
        "",
        *_queries_table(levels),
        "",
        "## (c) Sizes",
        "",
        *_sizes_table(levels),
        "",
    ]
    if pruned is not None:
        lines += _prune_text(pruned, args)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bigtable", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=_count, default=50_000_000, help="step rows at the last level (50M)")
    parser.add_argument(
        "--levels", help="comma-separated step-row levels (default: 0, 20%%, 50%%, 100%% of --rows)"
    )
    parser.add_argument("--history-days", type=float, default=90.0)
    parser.add_argument("--batches", type=int, default=30, help="whole batches per level (split pairs: half)")
    parser.add_argument("--sessions-per-batch", type=int, default=142, help="142 x 7 records ~ 1,000 records")
    parser.add_argument(
        "--prune-days", type=float, default=1.0, help="prune this much history at the end (0: no)"
    )
    parser.add_argument(
        "--min-free-gb", type=float, default=12.0, help="stop filling below this much free disk"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--out", type=Path, help="the report (default var/bench/bigtable-<rows>.md)")
    parser.add_argument(
        "--again", metavar="DATABASE", help="measure a database a --keep run filled again (same --rows)"
    )
    args = parser.parse_args(argv)
    args.levels = (
        sorted({_count(x) for x in args.levels.split(",")})
        if args.levels
        else [0, args.rows // 5, args.rows // 2, args.rows]
    )
    args.min_free = int(args.min_free_gb * 1024**3)
    configure_logging(level="WARNING", log_format="console")
    started = time.monotonic()
    asyncio.run(again(args) if args.again else run(args))
    _say(f"bigtable: done in {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
