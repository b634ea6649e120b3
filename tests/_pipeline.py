"""A test harness for the real pipeline: worker processes, a producer, and a telemetry reader.

Each ``PipelineStack`` has its own topology prefix and its own migrated database, so tests run in any
order and never see each other's queues or rows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from atlas_common import Topology
from bench._ports import stop_processes
from bench._stack import delete_topology
from producer import AuditReport, Producer, run_audit
from schemas import SessionClosed, SessionOpened, StepRecorded, TaskMessage, decode_telemetry_batch

ROOT = Path(__file__).resolve().parent.parent
Record = SessionOpened | StepRecorded | SessionClosed


@dataclass
class TelemetryLog:
    """Every telemetry record read so far, by adapter session."""

    by_session: dict[str, dict[int, Record]] = field(default_factory=lambda: defaultdict(dict))
    duplicates: int = 0

    def add(self, record: Record) -> None:
        seqs = self.by_session[record.adapter_session_id]
        if record.seq in seqs:
            self.duplicates += 1
        seqs[record.seq] = record

    def closes(self) -> list[SessionClosed]:
        return [r for s in self.by_session.values() for r in s.values() if isinstance(r, SessionClosed)]

    def opened(self) -> list[SessionOpened]:
        return [r for s in self.by_session.values() for r in s.values() if isinstance(r, SessionOpened)]

    def sessions_of(self, task_id: str) -> list[dict[int, Record]]:
        return [s for s in self.by_session.values() if next(iter(s.values())).task_id == task_id]

    def complete_in_sequence(self, adapter_session_id: str) -> bool:
        """opened (seq 0), steps 1..n, close (seq n+1, steps == n): nothing missing."""
        seqs = self.by_session[adapter_session_id]
        close = next((r for r in seqs.values() if isinstance(r, SessionClosed)), None)
        if close is None or not isinstance(seqs.get(0), SessionOpened):
            return False
        steps = [seqs.get(i) for i in range(1, close.steps + 1)]
        return set(seqs) == set(range(close.steps + 2)) and all(isinstance(s, StepRecorded) for s in steps)


@dataclass
class PipelineStack:
    amqp_url: str
    database_url: str
    prefix: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(prefix=self.prefix, retry_backoff_s=0.2)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AMQP_URL=self.amqp_url,
            DATABASE_URL=self.database_url,
            ATLAS_PREFIX=self.prefix,
            ATLAS_RETRY_BACKOFF_S="0.2",
            LOG_FORMAT="json",
            PYTHONPATH=str(ROOT),
        )
        env.update(extra)
        return env

    def start_worker(self, worker_id: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{worker_id}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env=self.env(WORKER_ID=worker_id, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.procs.append(proc)
        return proc

    @property
    def jsonl_dir(self) -> Path:
        return self.workdir / "jsonl"

    def start_ingestor(self, name: str = "ingestor", **env: str) -> subprocess.Popen[bytes]:
        """An ingestor process with fast timers, writing JSONL under ``self.jsonl_dir``."""
        log = (self.workdir / f"{name}.log").open("ab")
        settings = {
            "INGESTOR_JSONL_DIR": str(self.jsonl_dir),
            "INGESTOR_FLUSH_INTERVAL_S": "0.05",
            "INGESTOR_JSONL_MAX_AGE_S": "2",
            "INGESTOR_RECOVERY_INTERVAL_S": "1",
            "INGESTOR_SWEEP_INTERVAL_S": "2",
        }
        settings.update(env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingestor", "run"],
            env=self.env(**settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.procs.append(proc)
        return proc

    def log_of(self, worker_id: str) -> str:
        return (self.workdir / f"{worker_id}.log").read_text(errors="replace")

    async def submit(self, tasks: Iterable[TaskMessage]) -> list[str]:
        async with Producer(self.amqp_url, self.topology) as producer:
            report = await producer.submit_many(list(tasks))
        return report.task_ids

    async def declare(self) -> None:
        """Declare the task topology (what any producer or worker of this stack would declare)."""
        async with Producer(self.amqp_url, self.topology):
            pass

    async def publish_raw(self, body: bytes, *, message_id: str = "raw") -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange, _ = await self.topology.declare_tasks(channel)
            await exchange.publish(aio_pika.Message(body, message_id=message_id), "task")

    async def read_telemetry(
        self, log: TelemetryLog, *, until: Callable[[TelemetryLog], bool], timeout_s: float
    ) -> TelemetryLog:
        """Consume the ingestor queue (no ingestor runs in these tests) until ``until(log)`` holds."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=500)
            queue = await self.topology.declare_ingestor(channel)
            deadline = time.monotonic() + timeout_s
            async with queue.iterator() as messages:
                while not until(log):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("telemetry did not reach the expected state in time")
                    try:
                        message: AbstractIncomingMessage = await asyncio.wait_for(
                            messages.__anext__(), timeout=remaining
                        )
                    except TimeoutError:
                        continue
                    batch = decode_telemetry_batch(message.body, max_bytes=16 * 1024 * 1024)
                    assert not batch.rejects, batch.rejects
                    for record in batch.records:
                        log.add(record)
                    await message.ack()
        return log

    async def dead_letters(self, *, expect: int, timeout_s: float = 20.0) -> list[AbstractIncomingMessage]:
        """Read ``expect`` messages from the dead task queue (acking them)."""
        connection = await aio_pika.connect(self.amqp_url)
        got: list[AbstractIncomingMessage] = []
        async with connection:
            channel = await connection.channel()
            await self.topology.declare_dead_letters(channel)
            queue = await channel.get_queue(self.topology.dead_tasks_queue)
            deadline = time.monotonic() + timeout_s
            while len(got) < expect and time.monotonic() < deadline:
                message = await queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.1)
                    continue
                await message.ack()
                got.append(message)
        return got

    async def queue_depth(self, name: str, *, expect: int | None = None, timeout_s: float = 5.0) -> int:
        """Messages ready in ``name``. With ``expect``, poll until the count equals it or ``timeout_s``
        passes: messages handed back (nack, channel close) reappear in a quorum queue a moment later."""
        deadline = time.monotonic() + timeout_s
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            while True:
                queue = await channel.declare_queue(name, passive=True)
                depth = queue.declaration_result.message_count or 0
                if expect is None or depth == expect or time.monotonic() > deadline:
                    return depth
                await asyncio.sleep(0.05)

    async def ledger(self) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(
                "SELECT task_id, state, attempts, worker_id, last_error FROM task_ledger"
            )
            return rows
        finally:
            await conn.close()

    def stop_all(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Signal every process, wait up to ``timeout_s`` in all, then SIGKILL what is left."""
        stop_processes(self.procs, sig, timeout_s=timeout_s)

    async def audit(self, **options: Any) -> AuditReport:
        """``producer audit`` over this stack (its dead letters and JSONL files too), grace 0 unless given;
        fails the test when anything is unexplained."""
        options.setdefault("grace_s", 0)
        report = await run_audit(
            self.database_url,
            amqp_url=self.amqp_url,
            topology=self.topology,
            jsonl_dir=self.jsonl_dir,
            **options,
        )
        assert report.unexplained == 0, [f.to_json() for f in report.findings[:10]]
        return report

    async def delete_topology(self) -> None:
        """Remove every queue and exchange this stack's prefix created."""
        await delete_topology(self.amqp_url, self.topology)


def ledger_counts(rows: Iterable[Any]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["state"]] += 1
    return dict(counts)
