"""Ceilings: what RabbitMQ and PostgreSQL allow from Python on this machine, with no framework on top.

- publish: N persistent small messages through aio-pika with publisher confirms, up to ``window``
  publishes in flight (a semaphore), not one round trip each; timed from the first publish to the last
  confirm, on an empty queue of its own.
- consume: the same N messages (seen in the queue first), one consumer, prefetch ``prefetch``, acked with
  ``ack(multiple=True)`` every 100; timed from ``basic.consume`` to the last ack.
- COPY: asyncpg ``copy_records_to_table`` of step-like rows (session_id, step_id, trace text, output
  text, metadata jsonb) in batches of 1,000 (the ingestor's default batch).

Both queue types are measured: the atlas tasks queue is a quorum queue by default, Celery's and
Dramatiq's are classic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Final, Literal

import aio_pika
import aiormq
import asyncpg
import orjson

from bench._harness import QueueProbe, delete_queues, scratch_database, unique
from bench._report import Result

QueueType = Literal["quorum", "classic"]
ACK_EVERY: Final = 100
COPY_BATCH: Final = 1000
_BODY: Final = orjson.dumps(
    {
        "task_id": "ceiling-0000000",
        "task": "Research telemetry for LLM agents, compare two approaches and recommend one.",
        "metadata": {"source": "bench", "n": 0},
        "submitted_at": "2026-01-01T00:00:00Z",
    }
)


def publish_name(queue_type: QueueType) -> str:
    return f"ceiling: aio-pika publish, confirmed, {queue_type} queue"


def consume_name(queue_type: QueueType) -> str:
    return f"ceiling: aio-pika consume + ack, {queue_type} queue"


def copy_name(*, logged: bool) -> str:
    return f"ceiling: asyncpg COPY step rows, {'logged' if logged else 'temp'} table"


async def _publish(channel: aio_pika.abc.AbstractChannel, queue: str, n: int, window: int) -> float:
    slots = asyncio.Semaphore(window)
    failures: list[BaseException] = []
    exchange = channel.default_exchange

    async def one() -> None:
        try:
            confirm = await exchange.publish(
                aio_pika.Message(_BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue
            )
            if not isinstance(confirm, aiormq.spec.Basic.Ack):
                failures.append(RuntimeError(f"broker answered {type(confirm).__name__}"))
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below, after the others settle
            failures.append(exc)
        finally:
            slots.release()

    pending: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    for _ in range(n):
        await slots.acquire()
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(set(pending))
    elapsed = time.perf_counter() - started
    if failures:
        raise failures[0]
    return elapsed


async def _consume(channel: aio_pika.abc.AbstractChannel, queue: str, n: int, prefetch: int) -> float:
    await channel.set_qos(prefetch_count=prefetch)
    declared = await channel.get_queue(queue, ensure=False)
    done = asyncio.Event()
    count = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal count
        count += 1
        if count % ACK_EVERY == 0 or count == n:
            await message.ack(multiple=True)
        if count == n:
            done.set()

    started = time.perf_counter()
    tag = await declared.consume(on_message)
    await done.wait()
    elapsed = time.perf_counter() - started
    await declared.cancel(tag)
    return elapsed


async def broker_ceilings(
    amqp_url: str, n: int, queue_type: QueueType, *, window: int = 1000, prefetch: int = 1000
) -> list[Result]:
    """Publish then consume ``n`` messages on a fresh queue of ``queue_type``; deleted afterwards."""
    queue = unique(f"atlas-bench-ceiling-{queue_type}")
    try:
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection, QueueProbe(amqp_url) as probe:
            publisher = await connection.channel(publisher_confirms=True)
            await publisher.declare_queue(queue, durable=True, arguments={"x-queue-type": queue_type})
            await probe.wait_depth(queue, 0)
            published_s = await _publish(publisher, queue, n, window)
            await probe.wait_depth(queue, n)
            consumed_s = await _consume(await connection.channel(), queue, n, prefetch)
    finally:
        await delete_queues(amqp_url, [queue])
    return [
        Result(
            publish_name(queue_type),
            "msgs/s",
            n / published_s,
            notes=f"{n:,} x {len(_BODY)} B persistent, {window} confirms in flight",
        ),
        Result(
            consume_name(queue_type),
            "msgs/s",
            n / consumed_s,
            notes=f"{n:,} pre-filled, prefetch {prefetch}, ack(multiple=True) every {ACK_EVERY}",
        ),
    ]


def step_rows(n: int) -> list[tuple[uuid.UUID, int, str, str, str]]:
    """``n`` rows shaped like step_results: 6 steps per session, ~0.6 KB of text, a small jsonb."""
    trace = "Thought: compare the two approaches on cost, latency and failure modes. " * 6
    output = "Recommendation: approach A, because it keeps one session per task. " * 3
    rows = []
    session = uuid.uuid4()
    for i in range(n):
        if i % 6 == 0:
            session = uuid.uuid4()
        metadata = orjson.dumps({"tool": "search", "latency_ms": i % 97, "tokens": {"prompt": 120 + i % 7}})
        rows.append((session, i % 6, trace, output, metadata.decode()))
    return rows


_COLUMNS: Final = ("session_id", "step_id", "trace", "output", "metadata")
_TABLE_SQL: Final = (
    "CREATE {kind} TABLE bench_steps (session_id uuid NOT NULL, step_id integer NOT NULL, "
    "trace text NOT NULL, output text NOT NULL, metadata jsonb NOT NULL, PRIMARY KEY (session_id, step_id))"
)


async def _copy_into(database_url: str, n: int, *, logged: bool) -> float:
    rows = step_rows(n)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(_TABLE_SQL.format(kind="" if logged else "TEMP"))
        started = time.perf_counter()
        for offset in range(0, n, COPY_BATCH):
            await conn.copy_records_to_table(
                "bench_steps", records=rows[offset : offset + COPY_BATCH], columns=_COLUMNS
            )
        elapsed = time.perf_counter() - started
        copied = await conn.fetchval("SELECT count(*) FROM bench_steps")
    finally:
        await conn.close()
    if copied != n:
        raise RuntimeError(f"COPY stored {copied} of {n} rows")
    return elapsed


async def copy_ceilings(admin_database_url: str, n: int) -> list[Result]:
    """COPY ``n`` rows into a temp table and into a logged table, both in a scratch database."""
    results = []
    async with scratch_database(admin_database_url) as database_url:
        for logged in (False, True):
            seconds = await _copy_into(database_url, n, logged=logged)
            where = "logged table (WAL, like the ingestor's)" if logged else "TEMP table (no WAL)"
            results.append(
                Result(
                    copy_name(logged=logged),
                    "rows/s",
                    n / seconds,
                    notes=f"{n:,} rows into a {where} with a primary key, COPY batches of {COPY_BATCH}",
                )
            )
    return results
