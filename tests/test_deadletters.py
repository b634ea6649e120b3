"""Dead letters: ``dead list`` reads without consuming, ``dead requeue`` moves exactly the chosen ones back.

Real RabbitMQ: every test works under the unique prefix of the ``pipeline`` fixture (no worker runs), so
nothing consumes the queues behind the test's back.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, FieldValue

from atlas_common import (
    DEAD_TASK_ROUTING_KEY,
    DEAD_TELEMETRY_ROUTING_KEY,
    REASON_HEADER,
    dead_letter_headers,
)
from producer._deadletters import (
    DeadLetterError,
    Selection,
    describe,
    list_dead_letters,
    requeue_dead_letters,
    requeue_headers,
)
from schemas import SessionOpened, encode_telemetry_batch
from tests._pipeline import ROOT, PipelineStack

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel(pipeline: PipelineStack) -> AsyncIterator[AbstractChannel]:
    """A confirming channel on which the whole topology of the test's prefix is declared."""
    connection = await aio_pika.connect(pipeline.amqp_url)
    async with connection:
        ch = await connection.channel(publisher_confirms=True)
        await pipeline.topology.declare_tasks(ch)
        await pipeline.topology.declare_ingestor(ch)
        yield ch


def _task_body(task_id: str) -> bytes:
    return orjson.dumps({"schema_version": 1, "task_id": task_id, "task": f"do {task_id}"})


async def _dead_task(channel: AbstractChannel, pipeline: PipelineStack, task_id: str, reason: str) -> None:
    extra: dict[str, FieldValue] = {"x-atlas-retry": 2, "x-atlas-last-error": "boom", "x-custom": "keep me"}
    dead = await channel.get_exchange(pipeline.topology.dead_exchange)
    await dead.publish(
        aio_pika.Message(
            _task_body(task_id),
            message_id=task_id,
            content_type="application/json",
            type="atlas.task",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=dead_letter_headers(reason, source="worker", routing_key="task", extra=extra),
        ),
        DEAD_TASK_ROUTING_KEY,
    )


async def _drain(channel: AbstractChannel, queue_name: str) -> list[AbstractIncomingMessage]:
    queue = await channel.get_queue(queue_name)
    got: list[AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        await message.ack()
        got.append(message)
    return got


async def test_list_shows_reasons_and_consumes_nothing(
    pipeline: PipelineStack, channel: AbstractChannel
) -> None:
    """dead list reports id, reason, source, routing key, dead-at and a preview; depth and order unchanged."""
    for n in range(3):
        await _dead_task(channel, pipeline, f"t-{n}", f"failed 3 time(s); last error: error number {n}")
    topology = pipeline.topology

    first = await list_dead_letters(pipeline.amqp_url, topology, "tasks", limit=10)
    second = await list_dead_letters(pipeline.amqp_url, topology, "tasks", limit=2)

    assert first.present
    assert first.depth == 3
    assert [d.message_id for d in first.letters] == ["t-0", "t-1", "t-2"]
    assert [d.message_id for d in second.letters] == ["t-0", "t-1"]
    info = first.letters[1]
    assert info.reason == "failed 3 time(s); last error: error number 1"
    assert info.source == "worker"
    assert info.original_routing_key == "task"
    assert info.dead_at is not None
    assert datetime.fromisoformat(info.dead_at).tzinfo is not None
    assert info.retries == 2
    assert not info.broker_dead_lettered
    assert info.body_size == len(_task_body("t-1"))
    assert info.body_preview == _task_body("t-1").decode()[:80]
    assert await pipeline.queue_depth(topology.dead_tasks_queue, expect=3) == 3


async def test_list_shows_broker_dead_letter_after_delivery_limit(
    pipeline: PipelineStack, channel: AbstractChannel
) -> None:
    """A task the quorum queue dead-lettered past x-delivery-limit is listed with x-first-death-reason."""
    exchange = await channel.get_exchange(pipeline.topology.tasks_exchange)
    await exchange.publish(aio_pika.Message(_task_body("looper"), message_id="looper"), "task")
    tasks = await channel.get_queue(pipeline.topology.tasks_queue)
    for _ in range(pipeline.topology.delivery_limit + 5):  # each requeue counts as a delivery
        message = await tasks.get(no_ack=False, fail=False)
        if message is None:
            break
        await message.nack(requeue=True)
    for _ in range(50):
        if await pipeline.queue_depth(pipeline.topology.dead_tasks_queue) == 1:
            break
        await asyncio.sleep(0.1)

    listing = await list_dead_letters(pipeline.amqp_url, pipeline.topology, "tasks")

    [info] = listing.letters
    assert info.message_id == "looper"
    assert info.broker_dead_lettered
    assert info.reason is None
    assert info.source == "broker"
    assert info.first_death_reason == "delivery_limit"
    assert info.first_death_queue == pipeline.topology.tasks_queue
    assert info.deaths
    assert info.deaths[0].reason == "delivery_limit"
    assert info.original_routing_key == "task"
    assert "delivery_limit" in info.reason_text()

    report = await requeue_dead_letters(
        pipeline.amqp_url, pipeline.topology, Selection(reason_contains="DELIVERY_LIMIT")
    )
    assert report.requeued == 1
    [back] = await _drain(channel, pipeline.topology.tasks_queue)
    assert not any(k.startswith(("x-death", "x-first-death", "x-last-death")) for k in back.headers or {})


async def test_requeue_by_id_moves_exactly_those(pipeline: PipelineStack, channel: AbstractChannel) -> None:
    """requeue --id moves only the chosen tasks to the tasks queue, dead-letter and retry headers stripped."""
    for name in ("a", "b", "c"):
        await _dead_task(channel, pipeline, name, f"reason {name}")
    topology = pipeline.topology

    report = await requeue_dead_letters(
        pipeline.amqp_url, topology, Selection(ids=frozenset({"a", "c"})), "tasks"
    )

    assert (report.requeued, report.left, report.failed, report.examined) == (2, 1, 0, 3)
    assert sorted(i or "" for i in report.requeued_ids) == ["a", "c"]
    assert report.not_found_ids == []
    assert await pipeline.queue_depth(topology.dead_tasks_queue, expect=1) == 1
    assert await pipeline.queue_depth(topology.tasks_queue, expect=2) == 2
    moved = await _drain(channel, topology.tasks_queue)
    assert sorted(m.message_id or "" for m in moved) == ["a", "c"]
    for message in moved:
        headers = message.headers or {}
        assert not [k for k in headers if k.startswith("x-atlas-")], headers
        assert headers.get("x-custom") == "keep me"
        assert message.body == _task_body(message.message_id or "")
        assert message.content_type == "application/json"
        assert message.type == "atlas.task"
        assert message.routing_key == "task"
    [left] = (await list_dead_letters(pipeline.amqp_url, topology)).letters
    assert left.message_id == "b"
    assert left.reason == "reason b"


async def test_dry_run_moves_nothing(pipeline: PipelineStack, channel: AbstractChannel) -> None:
    """requeue --dry-run reports what would move and leaves both queues exactly as they were."""
    for name in ("x", "y"):
        await _dead_task(channel, pipeline, name, "adapter crashed")
    topology = pipeline.topology

    report = await requeue_dead_letters(pipeline.amqp_url, topology, Selection(all=True), dry_run=True)

    assert report.dry_run
    assert (report.requeued, report.examined) == (2, 2)
    assert await pipeline.queue_depth(topology.dead_tasks_queue, expect=2) == 2
    assert await pipeline.queue_depth(topology.tasks_queue, expect=0) == 0
    listing = await list_dead_letters(pipeline.amqp_url, topology)
    assert [d.message_id for d in listing.letters] == ["x", "y"]


async def test_requeue_telemetry_by_reason_uses_original_routing_key(
    pipeline: PipelineStack, channel: AbstractChannel
) -> None:
    """Telemetry dead letters matching --reason-contains go back to the telemetry exchange under their key."""
    dead = await channel.get_exchange(pipeline.topology.dead_exchange)
    record = SessionOpened(adapter_session_id="as-1", task_id="t-1", adapter="demo", task="x")
    for message_id, key, reason in (
        ("m1", "session.opened", "database down: could not store"),
        ("m2", "step", "undecodable body: not JSON"),
    ):
        await dead.publish(
            aio_pika.Message(
                encode_telemetry_batch([record]),
                message_id=message_id,
                headers=dead_letter_headers(reason, source="ingestor", routing_key=key),
            ),
            DEAD_TELEMETRY_ROUTING_KEY,
        )

    report = await requeue_dead_letters(
        pipeline.amqp_url, pipeline.topology, Selection(reason_contains="Database Down"), "telemetry"
    )

    assert (report.requeued, report.left) == (1, 1)
    [back] = await _drain(channel, pipeline.topology.ingestor_queue)
    assert back.message_id == "m1"
    assert back.routing_key == "session.opened"
    assert REASON_HEADER not in (back.headers or {})
    assert await pipeline.queue_depth(pipeline.topology.dead_telemetry_queue, expect=1) == 1


async def test_unroutable_requeue_leaves_the_dead_letter(
    pipeline: PipelineStack, channel: AbstractChannel
) -> None:
    """A copy the broker cannot route (no queue bound to its key) is not confirmed: the dead letter stays."""
    dead = await channel.get_exchange(pipeline.topology.dead_exchange)
    headers = dead_letter_headers("r", source="ingestor", routing_key="no.such.key")
    await dead.publish(
        aio_pika.Message(b"{}", message_id="lost?", headers=headers), DEAD_TELEMETRY_ROUTING_KEY
    )

    report = await requeue_dead_letters(
        pipeline.amqp_url, pipeline.topology, Selection(all=True), "telemetry"
    )

    assert (report.requeued, report.failed, report.left) == (0, 1, 1)
    assert "unroutable" in report.errors[0]
    [still] = (await list_dead_letters(pipeline.amqp_url, pipeline.topology, "telemetry")).letters
    assert still.message_id == "lost?"


async def test_requeue_without_target_exchange_fails_cleanly(pipeline: PipelineStack) -> None:
    """With a dead-letter queue but no tasks exchange, requeue raises a clear error and moves nothing."""
    connection = await aio_pika.connect(pipeline.amqp_url)
    async with connection:
        ch = await connection.channel(publisher_confirms=True)
        await pipeline.topology.declare_dead_letters(ch)
        await _dead_task(ch, pipeline, "orphan", "r")

    with pytest.raises(DeadLetterError, match=r"exchange .*\.tasks does not exist"):
        await requeue_dead_letters(pipeline.amqp_url, pipeline.topology, Selection(all=True))
    assert await pipeline.queue_depth(pipeline.topology.dead_tasks_queue, expect=1) == 1


async def _cli(pipeline: PipelineStack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "producer",
        *args,
        env=pipeline.env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_list_and_requeue(pipeline: PipelineStack, channel: AbstractChannel) -> None:
    """The CLI lists (text and JSON), requeues by id, and exits 1 naming an id it did not find."""
    await _dead_task(channel, pipeline, "cli-1", "failed 3 time(s); last error: timeout")
    await _dead_task(channel, pipeline, "cli-2", "failed 3 time(s); last error: bad input")

    rc, out, _ = await _cli(pipeline, "dead", "list")
    assert rc == 0
    assert "2 dead letter(s)" in out
    assert "cli-1" in out
    assert "last error: timeout" in out

    rc, out, _ = await _cli(pipeline, "dead", "list", "--json", "--limit", "1")
    assert rc == 0
    data = orjson.loads(out)
    assert data["depth"] == 2
    assert [d["message_id"] for d in data["dead_letters"]] == ["cli-1"]
    assert data["dead_letters"][0]["source"] == "worker"

    rc, out, _ = await _cli(pipeline, "dead", "requeue", "--id", "cli-2", "--dry-run")
    assert rc == 0
    assert "would requeue 1" in out
    rc, out, _ = await _cli(pipeline, "dead", "requeue", "--id", "cli-2", "nope")
    assert rc == 1
    assert "requeued 1, left 1" in out
    assert "not found: nope" in out
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue, expect=1) == 1
    assert await pipeline.queue_depth(pipeline.topology.dead_tasks_queue, expect=1) == 1


def test_describe_broker_headers() -> None:
    """describe() reads the broker's x-death / x-first-death-* headers when there is no Atlas reason."""
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers: dict[str, object] = {
        "x-first-death-reason": "delivery_limit",
        "x-first-death-queue": "atlas.tasks",
        "x-death": [
            {
                "count": 1,
                "reason": "delivery_limit",
                "queue": "atlas.tasks",
                "time": when,
                "exchange": "atlas.tasks",
                "routing-keys": ["task"],
            }
        ],
    }
    info = describe(b"x" * 200, headers, "m")
    assert info.source == "broker"
    assert info.original_routing_key == "task"
    assert info.dead_at == when.isoformat()
    assert info.reason_text() == "broker: delivery_limit in atlas.tasks"
    assert (info.body_size, len(info.body_preview)) == (200, 80)


def test_requeue_headers_and_selection() -> None:
    """requeue_headers keeps only non-dead-letter headers; a Selection needs exactly one criterion."""
    headers: dict[str, FieldValue] = {
        **dead_letter_headers("r", source="worker", routing_key="task"),
        "x-atlas-retry": 2,
        "x-death": [],
        "x-first-death-reason": "rejected",
        "x-delivery-count": 3,
        "trace-id": "abc",
    }
    assert requeue_headers(headers) == {"trace-id": "abc"}
    with pytest.raises(ValueError, match="exactly one"):
        Selection()
    with pytest.raises(ValueError, match="exactly one"):
        Selection(all=True, reason_contains="x")
