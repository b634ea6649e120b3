"""The main job: a real end-to-end run on this machine.

Applies the migrations, starts an ingestor, 2 workers and the web console (processes), submits N demo
tasks, waits until every session is in PostgreSQL and in a finalised JSONL file, prints a summary ending
with the console's URL for the run, shuts everything down (on a terminal, the console once Enter is
pressed).
``./atlas run [--tasks N]`` (or ``python -m bench.mainjob``). Uses $AMQP_URL / $DATABASE_URL.

:func:`run_stack` is the run itself (start the processes, submit, wait until stored, stop them); the
end-to-end benchmark rows (:mod:`bench._e2e`) run the same function on a scratch database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
from tqdm import tqdm

from atlas_common import BROKER_ERRORS, Topology, configure_logging, connect_any, redact_url
from bench._ports import stop_processes
from bench._services import HOW_TO_GET_SERVICES, ROOT, ensure_services
from bench._stack import delete_topology, jsonl_stats, percentile
from migrations import apply_migrations
from producer import Producer, demo_tasks
from schemas import TaskMessage


@dataclass
class Run:
    amqp_url: str
    database_url: str
    tasks: int
    workers: int
    concurrency: int
    demo_latency_s: float
    ingestors: int = 1
    """Ingestor processes (``ingestor``, then ``ingestor-2``, ...)."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    """Process name (``ingestor``, ``worker-1``, ...) -> pid, as started."""
    exit_codes: list[int] = field(default_factory=list)
    """Set when :func:`running_stack` stopped the processes cleanly."""
    prefix_stem: str = "atlas-run"
    """The topology prefix is ``<prefix_stem>-<run_id>``: a run's queues are its own."""
    runs_dir: Path = ROOT / "var" / "runs"
    """Where the run's directory (logs, JSONL) goes: ``<runs_dir>/<run_id>``."""

    @property
    def prefix(self) -> str:
        return f"{self.prefix_stem}-{self.run_id}"

    @property
    def topology(self) -> Topology:
        return Topology(prefix=self.prefix)

    @property
    def workdir(self) -> Path:
        return self.runs_dir / self.run_id

    @property
    def jsonl_dir(self) -> Path:
        return self.workdir / "jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AMQP_URL=self.amqp_url,
            DATABASE_URL=self.database_url,
            ATLAS_PREFIX=self.prefix,
            INGESTOR_JSONL_DIR=str(self.jsonl_dir),
            LOG_FORMAT="json",
        )
        env.update(extra)
        return env

    def spawn(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], env=self.env(**env), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.procs.append(proc)
        self.pids[name] = proc.pid
        return proc


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run measured: when each task was published and when its session was stored."""

    submitted: dict[str, float]
    """task_id -> wall-clock time (``time.time()``) the producer published it."""
    stored: dict[str, float]
    """task_id -> ``sessions.stored_at``: complete in PostgreSQL and assigned to a JSONL file."""
    exit_codes: list[int]

    @property
    def started(self) -> float:
        return min(self.submitted.values())

    @property
    def finished(self) -> float:
        return max(self.stored.values())

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def throughput(self) -> float:
        """Tasks per second, first submit to last stored."""
        return len(self.stored) / self.seconds

    def latencies(self) -> list[float]:
        """Sorted submit-to-stored seconds of every stored task."""
        return sorted(self.stored[t] - self.submitted[t] for t in self.stored if t in self.submitted)


def check_alive(run: Run) -> None:
    for proc in run.procs:
        if proc.poll() is not None:
            raise RuntimeError(f"a pipeline process exited early ({proc.args!r}); see {run.workdir}")


_STORED = "FROM sessions WHERE task_id LIKE $1 AND status = 'succeeded' AND export_file IS NOT NULL"
_STORED_COUNT = f"SELECT count(*) {_STORED}"
_STORED_TIMES = f"SELECT task_id, stored_at {_STORED}"


async def wait_stored(run: Run, conn: asyncpg.Connection, *, progress: bool) -> dict[str, float]:
    """Poll (a count) until every task has a succeeded session assigned to a JSONL file; returns task ->
    stored time (``sessions.stored_at``, set by the ingestor, so the poll interval does not blur it)."""
    like = f"demo-{run.run_id}-%"
    bar = tqdm(total=run.tasks, unit="session", desc="stored  ", file=sys.stderr, disable=not progress)
    try:
        while True:
            done: int = await conn.fetchval(_STORED_COUNT, like)
            bar.update(done - bar.n)
            if done >= run.tasks:
                break
            check_alive(run)
            await asyncio.sleep(0.2)
    finally:
        bar.close()
    rows = await conn.fetch(_STORED_TIMES, like)
    return {row["task_id"]: row["stored_at"].timestamp() for row in rows}


async def _wait_consumers(run: Run, *, timeout_s: float = 60.0) -> None:
    """Until every worker consumes the tasks queue and every ingestor its queue (start-up is not timed)."""
    topology = run.topology
    want = {topology.tasks_queue: run.workers, topology.ingestor_queue: run.ingestors}
    deadline = time.monotonic() + timeout_s
    connection = await connect_any(run.amqp_url, timeout_s=10, name="atlas-bench")  # a node of a cluster
    async with connection:
        while True:
            seen = {}
            for queue in want:
                channel = await connection.channel()  # a passive declare of a missing queue closes it
                try:
                    declared = await channel.declare_queue(queue, passive=True)
                    seen[queue] = declared.declaration_result.consumer_count or 0
                except BROKER_ERRORS:
                    seen[queue] = 0
                finally:
                    if not channel.is_closed:
                        await channel.close()
            if all(seen[q] >= n for q, n in want.items()):
                return
            check_alive(run)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"consumers after {timeout_s}s: {seen}, expected {want}; see {run.workdir}"
                )
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_stack(run: Run, *, wait_ready: bool = False) -> AsyncIterator[Run]:
    """The processes of a run: ``run.ingestors`` ingestors and ``run.workers`` workers, started on entry. On
    a clean exit they get SIGTERM (an ingestor finalises its JSONL file) and their exit codes go to
    ``run.exit_codes``; on an error they are stopped (killed if need be) too. With ``wait_ready`` the body
    starts only once every process consumes its queue, so process start-up is not part of what it times."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    try:
        for n in range(run.ingestors):
            run.spawn("ingestor" if n == 0 else f"ingestor-{n + 1}", "ingestor", "run")
        for n in range(run.workers):
            run.spawn(
                f"worker-{n + 1}",
                "worker",
                "--concurrency",
                str(run.concurrency),
                "--demo-latency-s",
                str(run.demo_latency_s),
                WORKER_ID=f"{run.run_id}-w{n + 1}",
            )
        if wait_ready:
            await _wait_consumers(run)
        yield run
        run.exit_codes = _stop(run)
    finally:
        _stop(run, timeout_s=10)


def stamped(tasks: Iterable[TaskMessage], submitted: dict[str, float]) -> Iterator[TaskMessage]:
    """``tasks``, each stamped in ``submitted`` (``time.time()``) as the producer takes it to publish."""
    for task in tasks:
        submitted[task.task_id] = time.time()
        yield task


async def run_stack(
    run: Run, conn: asyncpg.Connection, *, progress: bool = True, wait_ready: bool = False
) -> Outcome:
    """Start an ingestor and ``run.workers`` workers, submit ``run.tasks`` demo tasks, wait until every
    session is stored, stop the processes (SIGTERM: the ingestor finalises its JSONL file).

    ``conn`` is a connection to ``run.database_url`` (migrated). With ``wait_ready`` the tasks go out
    only once every process consumes its queue, so process start-up is not part of the timing.
    """
    async with running_stack(run, wait_ready=wait_ready):
        submitted: dict[str, float] = {}
        bar = tqdm(total=run.tasks, unit="task", desc="submitted", file=sys.stderr, disable=not progress)
        async with Producer(run.amqp_url, run.topology) as producer:
            await producer.submit_many(
                stamped(demo_tasks(run.tasks, run_id=run.run_id), submitted), on_confirmed=bar.update
            )
        bar.close()
        stored = await wait_stored(run, conn, progress=progress)
    return Outcome(submitted=submitted, stored=stored, exit_codes=run.exit_codes)


async def _summary(run: Run, conn: asyncpg.Connection, outcome: Outcome) -> str:
    like = f"demo-{run.run_id}-%"
    by_status = await conn.fetch(
        "SELECT status, count(*) AS n FROM sessions WHERE task_id LIKE $1 GROUP BY status ORDER BY status",
        like,
    )
    totals = await conn.fetchrow(
        """
        SELECT count(DISTINCT s.task_id) AS tasks,
               (SELECT count(*) FROM step_results r JOIN sessions x ON x.id = r.session_id
                 WHERE x.task_id LIKE $1) AS steps,
               coalesce(sum((s.adapter_usage->>'prompt_tokens')::bigint), 0) AS prompt_tokens,
               coalesce(sum((s.adapter_usage->>'completion_tokens')::bigint), 0) AS completion_tokens,
               coalesce(sum((s.adapter_usage->>'calls')::bigint), 0) AS calls
        FROM sessions s WHERE s.task_id LIKE $1
        """,
        like,
    )
    files, lines = jsonl_stats(run.jsonl_dir)
    latencies = outcome.latencies()
    wall = outcome.seconds
    status_text = ", ".join(f"{r['status']} {r['n']}" for r in by_status)
    return "\n".join(
        [
            "",
            (
                f"atlas-pipeline main job {run.run_id}: {run.tasks} demo tasks, {run.workers} workers x "
                f"concurrency {run.concurrency}, demo latency {run.demo_latency_s:g}s"
            ),
            f"  tasks           {totals['tasks']}",
            f"  sessions        {status_text}",
            f"  steps           {totals['steps']} ({totals['calls']} adapter calls)",
            f"  tokens          {totals['prompt_tokens']} prompt + {totals['completion_tokens']} completion",
            f"  JSONL           {lines} lines in {files} finalised file(s) under {run.jsonl_dir}",
            f"  throughput      {run.tasks / wall:.0f} tasks/s ({wall:.1f}s, first submit to last stored)",
            (
                f"  latency         submit->stored p50 {percentile(latencies, 50) * 1000:.0f} ms, "
                f"p99 {percentile(latencies, 99) * 1000:.0f} ms"
            ),
            f"  database        {redact_url(run.database_url)}",
        ]
    )


def _stop(run: Run, timeout_s: float = 60.0) -> list[int]:
    return stop_processes(run.procs, timeout_s=timeout_s)


CONSOLE_PORT = 8070


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens on it on loopback, else 0 (the console picks a free one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


@contextlib.contextmanager
def console_process(run: Run, *, timeout_s: float = 30.0) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The web console on the run's prefix and database, loopback only; yields it and its URL (read from
    its ``console: <url>`` line); stopped (SIGTERM, then SIGKILL) on exit."""
    port = os.environ.get("CONSOLE_PORT") or str(_free_port(CONSOLE_PORT))
    log_path = run.workdir / "console.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "console"],
            env=run.env(CONSOLE_PORT=port, CONSOLE_HOST="127.0.0.1"),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + timeout_s
        url = None
        while url is None:
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("console: "):
                    url = line.removeprefix("console: ").strip()
            if url is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the console did not start; see {log_path}")
                time.sleep(0.1)
        yield proc, url
    finally:
        stop_processes([proc], timeout_s=10)


def run_url(console_url: str, outcome: Outcome) -> str:
    """The console's sessions list narrowed to the run's time span."""
    since = datetime.fromtimestamp(outcome.started - 1, UTC).isoformat(timespec="seconds")
    until = datetime.fromtimestamp(outcome.finished + 1, UTC).isoformat(timespec="seconds")
    return f"{console_url.rstrip('/')}/sessions?{urlencode({'since': since, 'until': until})}"


async def main_async(run: Run, *, keep_console: bool | None = None) -> int:
    problems = await ensure_services(run.amqp_url, run.database_url)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(HOW_TO_GET_SERVICES, file=sys.stderr)
        return 2
    run.workdir.mkdir(parents=True, exist_ok=True)
    applied = await apply_migrations(run.database_url)
    print(f"migrations: {len(applied)} applied; run {run.run_id}, logs in {run.workdir}", flush=True)
    conn = await asyncpg.connect(run.database_url)
    try:
        with console_process(run) as (_, console_url):
            print(f"console: {console_url} (live while the job runs)", flush=True)
            outcome = await run_stack(run, conn)
            if any(outcome.exit_codes):
                print(f"warning: exit codes {outcome.exit_codes}; see logs in {run.workdir}", file=sys.stderr)
            print(await _summary(run, conn, outcome))
            print(f"  console         {run_url(console_url, outcome)}", flush=True)
            if keep_console is None:
                keep_console = sys.stdin.isatty() and sys.stdout.isatty()
            if keep_console:
                print("the console keeps serving this run: press Enter to stop it", flush=True)
                with contextlib.suppress(KeyboardInterrupt, EOFError):
                    await asyncio.to_thread(sys.stdin.readline)
            else:
                print(f"  (stopped with the job; ATLAS_PREFIX={run.prefix} ./atlas console serves it again)")
    finally:
        await conn.close()
        await delete_topology(run.amqp_url, run.topology)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas run", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="demo tasks to run (default 1000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--demo-latency-s", type=float, default=0.0, help="simulated LLM latency per call")
    parser.add_argument(
        "--keep-console",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the web console serving after the summary until Enter (default: on a terminal)",
    )
    args = parser.parse_args(argv)
    configure_logging(level="WARNING")
    run = Run(
        amqp_url=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        tasks=args.tasks,
        workers=args.workers,
        concurrency=args.concurrency,
        demo_latency_s=args.demo_latency_s,
    )
    return asyncio.run(main_async(run, keep_console=args.keep_console))


if __name__ == "__main__":
    raise SystemExit(main())
