"""The main job: a real end-to-end run on this machine.

Applies the migrations, starts an ingestor and 2 workers (processes), submits N demo tasks, waits until
every session is in PostgreSQL and in a finalised JSONL file, prints a summary, shuts everything down.
``./atlas run [--tasks N]`` (or ``python -m bench.mainjob``). Uses $AMQP_URL / $DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from tqdm import tqdm

from atlas_common import Topology, configure_logging, redact_url
from bench._services import HOW_TO_GET_SERVICES, ROOT, ensure_services
from bench._stack import delete_topology, jsonl_stats, percentile
from migrations import apply_migrations
from producer import Producer, demo_tasks


@dataclass
class Run:
    amqp_url: str
    database_url: str
    tasks: int
    workers: int
    concurrency: int
    demo_latency_s: float
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"atlas-run-{self.run_id}"

    @property
    def workdir(self) -> Path:
        return ROOT / "var" / "runs" / self.run_id

    @property
    def jsonl_dir(self) -> Path:
        return self.workdir / "jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AMQP_URL=self.amqp_url,
            DATABASE_URL=self.database_url,
            ATLAS_PREFIX=self.prefix,
            JSONL_DIR=str(self.jsonl_dir),
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
        return proc


async def _wait_stored(run: Run, conn: asyncpg.Connection) -> dict[str, float]:
    """Poll until every task has a succeeded session assigned to a JSONL file; returns task -> stored time."""
    stored: dict[str, float] = {}
    bar = tqdm(total=run.tasks, unit="session", desc="stored  ", file=sys.stderr)
    try:
        while len(stored) < run.tasks:
            rows = await conn.fetch(
                "SELECT task_id, stored_at FROM sessions WHERE task_id LIKE $1 AND status = 'succeeded' "
                "AND export_file IS NOT NULL",
                f"demo-{run.run_id}-%",
            )
            for row in rows:
                if row["task_id"] not in stored:
                    stored[row["task_id"]] = row["stored_at"].timestamp()
            bar.update(len(stored) - bar.n)
            for proc in run.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a pipeline process exited early ({proc.args!r}); see {run.workdir}")
            await asyncio.sleep(0.2)
    finally:
        bar.close()
    return stored


async def _summary(
    run: Run,
    conn: asyncpg.Connection,
    *,
    submitted: dict[str, float],
    stored: dict[str, float],
    started: float,
    finished: float,
) -> str:
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
    latencies = sorted(stored[t] - submitted[t] for t in stored if t in submitted)
    wall = finished - started
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
    for proc in run.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = []
    for proc in run.procs:
        try:
            codes.append(proc.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


async def main_async(run: Run) -> int:
    problems = await ensure_services(run.amqp_url, run.database_url)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(HOW_TO_GET_SERVICES, file=sys.stderr)
        return 2
    run.workdir.mkdir(parents=True, exist_ok=True)
    applied = await apply_migrations(run.database_url)
    print(f"migrations: {len(applied)} applied; run {run.run_id}, logs in {run.workdir}", flush=True)
    topology = Topology(prefix=run.prefix)
    conn = await asyncpg.connect(run.database_url)
    try:
        run.spawn("ingestor", "ingestor", "run")
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
        tasks = list(demo_tasks(run.tasks, run_id=run.run_id))
        submitted = {t.task_id: t.submitted_at.timestamp() for t in tasks}
        started = time.time()
        bar = tqdm(total=run.tasks, unit="task", desc="submitted", file=sys.stderr)
        async with Producer(run.amqp_url, topology) as producer:
            for task in tasks:  # stamp submit times as they go out, not when the list was built
                submitted[task.task_id] = time.time()
            await producer.submit_many(tasks, on_confirmed=bar.update)
        bar.close()
        stored = await _wait_stored(run, conn)
        finished = max(stored.values())
        codes = _stop(run)
        if any(codes):
            print(f"warning: exit codes {codes}; see logs in {run.workdir}", file=sys.stderr)
        print(
            await _summary(run, conn, submitted=submitted, stored=stored, started=started, finished=finished)
        )
    finally:
        _stop(run, timeout_s=10)
        await conn.close()
        await delete_topology(run.amqp_url, topology)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas run", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="demo tasks to run (default 1000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--demo-latency-s", type=float, default=0.0, help="simulated LLM latency per call")
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
    return asyncio.run(main_async(run))


if __name__ == "__main__":
    raise SystemExit(main())
