"""What every benchmark shares: unique names, scratch databases, queue depth, worker processes, drain timing.

The task-leg method (every framework, ours included): the queue is pre-filled with N tasks and seen full,
then the worker process(es) start; the queue depth is polled (passive declare) every ``poll_s``;
``t0`` is the first poll where depth < N (consumption has started, so process start-up is excluded),
``t1`` the first poll where depth == 0. ``rate = delivered / (t1 - t0)`` where delivered is the depth at
``t0``: between ``t0`` and ``t1`` the consumers' prefetch windows are full at both ends, so messages
delivered equal messages acked in that span. After ``t1`` the harness waits for the last unacked
deliveries to finish, stops the workers and counts what was left in the queue: ``consumed`` is N minus that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection

from atlas_common import BROKER_ERRORS
from bench._ports import stop_processes
from bench._services import ROOT


def unique(prefix: str) -> str:
    """``<prefix>-<8 hex>``: queue names, prefixes and databases no other run uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def database_url_for(admin_url: str, database: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{database}"


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str) -> AsyncIterator[str]:
    """A new empty database ``atlas_bench_<hex>`` on the server of ``admin_url``, dropped on exit."""
    name = f"atlas_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield database_url_for(admin_url, name)
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


class QueueProbe:
    """Passive declares on one connection: the ready-message count of a queue, cheaply and often."""

    def __init__(self, amqp_url: str) -> None:
        self._url = amqp_url
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> QueueProbe:
        self._connection = await aio_pika.connect(self._url, timeout=10)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _declared(self, queue: str) -> aiormq.spec.Queue.DeclareOk:
        """A passive declare of ``queue`` (a missing one closes the channel: the next call opens another)."""
        if self._connection is None:
            raise RuntimeError("use 'async with QueueProbe(url)'")
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        declared = await self._channel.declare_queue(queue, passive=True)
        return declared.declaration_result

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting delivered-but-unacked ones)."""
        return (await self._declared(queue)).message_count or 0

    async def consumers(self, queue: str) -> int:
        """Consumers of ``queue``; 0 while it does not exist yet."""
        try:
            declared = await self._declared(queue)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        return declared.consumer_count or 0

    async def wait_depth(self, queue: str, expected: int, *, timeout_s: float = 60.0) -> None:
        """Until ``queue`` holds exactly ``expected`` ready messages (publishes without confirms lag)."""
        deadline = time.monotonic() + timeout_s
        while (depth := await self.depth(queue)) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue} holds {depth} messages, expected {expected}")
            await asyncio.sleep(0.05)


async def delete_queues(amqp_url: str, queues: Sequence[str], exchanges: Sequence[str] = ()) -> None:
    """Delete what a benchmark declared; missing ones are fine (a channel per name: errors close it)."""
    with contextlib.suppress(*BROKER_ERRORS):
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection:
            for name in queues:
                channel = await connection.channel()
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.queue_delete(name)
            for name in exchanges:
                channel = await connection.channel()
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.exchange_delete(name)


def rabbitmqctl_unacked(queue: str) -> int | None:
    """``messages_unacknowledged`` of ``queue`` from ``rabbitmqctl`` (None where it is not available)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged", "--no-table-headers"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return None


@dataclass
class Processes:
    """Worker processes of one measurement: started with their own log files, stopped with SIGTERM."""

    logdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        self.logdir.mkdir(parents=True, exist_ok=True)
        with (self.logdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                list(argv), env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.procs.append(proc)
        return proc

    def check_running(self) -> None:
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"{proc.args!r} exited early with code {code}; logs in {self.logdir}")

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_processes(self.procs, timeout_s=timeout_s)


def python_module(*args: str) -> list[str]:
    """``python -m ...`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", *args]


@dataclass(frozen=True, slots=True)
class Drain:
    """One task-leg measurement; see the module docstring for the method."""

    total: int
    delivered: int
    """Depth at t0: what was delivered (and, in steady state, acked) between t0 and t1."""
    seconds: float
    consumed: int
    """N minus what was left in the queue after the workers stopped."""

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds


async def measure_drain(
    probe: QueueProbe,
    queue: str,
    total: int,
    procs: Processes,
    *,
    poll_s: float = 0.05,
    timeout_s: float = 600.0,
    finished: Callable[[], Awaitable[bool]] | None = None,
) -> Drain:
    """Time the drain of a pre-filled ``queue`` by already started ``procs``, then stop them.

    ``finished`` (optional, polled) says whether the workers' own records show every task done (e.g. a
    ledger count); otherwise the harness waits for ``rabbitmqctl``'s unacked count to reach 0, or a
    second where it cannot ask.
    """
    deadline = time.monotonic() + timeout_s
    t0: float | None = None
    delivered = 0
    while True:
        depth = await probe.depth(queue)
        now = time.perf_counter()
        if t0 is None and depth < total:
            if depth == 0:
                raise RuntimeError(
                    f"{queue}: drained between two polls ({poll_s}s); use more tasks to measure a rate"
                )
            t0, delivered = now, depth
        elif t0 is not None and depth == 0:
            t1 = now
            break
        procs.check_running()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue} still holds {depth} of {total} tasks after {timeout_s}s")
        await asyncio.sleep(poll_s)
    if finished is not None:
        while not await finished():
            procs.check_running()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{queue}: the workers did not finish every task in {timeout_s}s")
            await asyncio.sleep(poll_s)
    else:
        await _wait_unacked_zero(queue, deadline)
    await asyncio.to_thread(procs.stop)
    left = await probe.depth(queue)
    return Drain(total=total, delivered=delivered, seconds=t1 - t0, consumed=total - left)


async def _wait_unacked_zero(queue: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        unacked = await asyncio.to_thread(rabbitmqctl_unacked, queue)
        if unacked is None:
            await asyncio.sleep(1.0)
            return
        if unacked == 0:
            return
        await asyncio.sleep(0.2)


async def wait_consumption(
    probe: QueueProbe,
    queue: str,
    total: int,
    procs: Processes,
    *,
    poll_s: float = 0.02,
    timeout_s: float = 120.0,
) -> float:
    """``time.time()`` at the first poll where the pre-filled ``queue`` (``total`` ready messages) holds
    fewer: the started ``procs`` consume it, so their start-up is not part of what is timed next."""
    deadline = time.monotonic() + timeout_s
    while await probe.depth(queue) >= total:
        procs.check_running()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing consumed {queue} within {timeout_s}s; logs in {procs.logdir}")
        await asyncio.sleep(poll_s)
    return time.time()


def proc_status_kib(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of ``/proc/<pid>/status`` in KiB (``VmRSS``, ``VmHWM``: the peak RSS, ...)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values
