"""Valid telemetry for the ingestor rows: demo-shaped sessions, published as ``TelemetryBatch`` envelopes.

One template session is built (and validated) with the :mod:`schemas` models in the shape the demo
adapter's sessions have: opened, a plan step, 3 execute steps with tool events, a synthesis step and a
succeeded close, 7 records of about 1 KB each. Every generated session is a copy with its own
``adapter_session_id`` and ``task_id``. Sessions go out in chunks of ``CHUNK_SESSIONS``: the chunk's
opened records, then its steps, then its closes, so each session arrives in order; records share an
envelope only with records of the same kind, up to ``MAX_RECORDS`` records or ``MAX_BYTES`` bytes (the
worker's batcher limits). The envelope bytes are exactly :func:`schemas.encode_telemetry_batch`'s (see
:func:`check_envelopes`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aio_pika
import aiormq
import orjson

from atlas_common import Topology
from schemas import (
    SCHEMA_VERSION,
    SessionClosed,
    SessionOpened,
    StepRecorded,
    Usage,
    decode_telemetry_batch,
    encode_telemetry_batch,
)

Record = SessionOpened | StepRecorded | SessionClosed
RECORDS_PER_SESSION: Final = 7
MAX_RECORDS: Final = 500
MAX_BYTES: Final = 256 * 1024
CHUNK_SESSIONS: Final = 500
KINDS: Final = ("session.opened", "step", "session.closed")
_T0: Final = datetime(2026, 1, 1, 9, 0, 0, tzinfo=UTC)
_TASK: Final = "Research telemetry for LLM agents, compare two approaches and recommend one (case 7)."


def _step(
    seq: int, phase: str, *, description: str, output: Any, trace: str, events: list[Any]
) -> StepRecorded:
    started = _T0 + timedelta(milliseconds=50 * seq)
    return StepRecorded.model_validate(
        {
            "adapter_session_id": "as-template",
            "task_id": "task-template",
            "seq": seq,
            "step_id": seq - 1,
            "phase": phase,
            "description": description,
            "output": output,
            "trace": trace,
            "usage": {"prompt_tokens": 60 + 10 * seq, "completion_tokens": 20, "total_tokens": 80 + 10 * seq},
            "events": events,
            "started_at": started,
            "finished_at": started + timedelta(milliseconds=50),
            "emitted_at": started + timedelta(milliseconds=50),
        }
    )


def template_session() -> list[Record]:
    """The 7 records of one demo-shaped session, validated by the schemas models."""
    parts = [
        f"{action}: {_TASK[:60]} (part {i})" for i, action in enumerate(("Research", "Compare", "Draft"), 1)
    ]
    plan = {
        "steps": [
            {"id": i, "description": d, "depends_on": [i - 1] if i > 1 else []}
            for i, d in enumerate(parts, 1)
        ]
    }
    opened = SessionOpened(
        adapter_session_id="as-template",
        task_id="task-template",
        adapter="demo",
        task=_TASK,
        metadata={"adapter": "demo", "demo": True},
        task_metadata={"source": "bench", "n": 7},
        opened_at=_T0,
        emitted_at=_T0,
    )
    plan_trace = f"Task: {_TASK}\n\nPlan the steps. Reply with JSON only. " * 2
    steps = [_step(1, "plan", description="Plan the steps", output=plan, trace=plan_trace, events=[])]
    notes = []
    for i, description in enumerate(parts, 1):
        result = f"search found {17 * i} items"
        notes.append(f"Step {i} ({description}): Step {i} via search: {result}")
        events = [
            {"type": "tool_call", "tool": "search", "arguments": {"query": description[:60]}},
            {"type": "tool_result", "tool": "search", "result": result},
        ]
        trace = (
            f"Task: {_TASK}\n\nOutputs of earlier steps:\n" + "\n".join(notes[:-1]) + f"\n\nNow do step {i}"
        )
        output = f"Step {i} via search: {result}"
        steps.append(
            _step(i + 1, "execute", description=description, output=output, trace=trace, events=events)
        )
    answer = f"Answer to {_TASK!r}: 3 steps in 5 turns. " + "; ".join(notes)
    trace = "\n".join(notes)
    steps.append(_step(5, "synthesize", description="Synthesize", output=answer, trace=trace, events=[]))
    totals = Usage()
    for step in steps:
        totals += step.usage
    closed = SessionClosed(
        adapter_session_id="as-template",
        task_id="task-template",
        seq=len(steps) + 1,
        status="succeeded",
        final_answer=answer,
        plan=plan,
        totals=totals,
        events=[event for step in steps for event in step.events],
        close_metadata={"turns": 5, "notes": 3},
        steps=len(steps),
        closed_at=steps[-1].finished_at,
        emitted_at=steps[-1].finished_at,
    )
    return [opened, *steps, closed]


def sessions_for(records: int) -> int:
    """How many sessions make at least ``records`` records."""
    return math.ceil(records / RECORDS_PER_SESSION)


def _envelope(kind: str, parts: list[bytes]) -> bytes:
    return b'{"schema_version":%d,"kind":"%s","records":[%s]}' % (
        SCHEMA_VERSION,
        kind.encode(),
        b",".join(parts),
    )


def _split(kind: str, records: list[dict[str, Any]]) -> Iterator[bytes]:
    parts: list[bytes] = []
    size = 0
    for record in records:
        part = orjson.dumps(record)
        if parts and (len(parts) >= MAX_RECORDS or size + len(part) > MAX_BYTES):
            yield _envelope(kind, parts)
            parts, size = [], 0
        parts.append(part)
        size += len(part) + 1
    if parts:
        yield _envelope(kind, parts)


def envelopes(n_sessions: int, run_id: str) -> Iterator[tuple[str, bytes]]:
    """``(routing key = kind, envelope body)`` for ``n_sessions`` sessions, in publishing order."""
    templates = [r.model_dump(mode="json") for r in template_session()]
    for start in range(0, n_sessions, CHUNK_SESSIONS):
        by_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for i in range(start, min(start + CHUNK_SESSIONS, n_sessions)):
            ids = {"adapter_session_id": f"as-{run_id}-{i:08d}", "task_id": f"bench-{run_id}-{i:08d}"}
            for template in templates:
                by_kind[template["kind"]].append({**template, **ids})
        for kind in KINDS:
            for body in _split(kind, by_kind[kind]):
                yield kind, body


def check_envelopes(run_id: str = "check") -> None:
    """The generated bytes are ``encode_telemetry_batch``'s and decode with no rejected record."""
    records = template_session()
    for kind, body in envelopes(1, run_id):
        decoded = decode_telemetry_batch(body)
        if decoded.rejects or decoded.kind != kind:
            raise AssertionError(f"generated {kind} envelope does not decode cleanly: {decoded.rejects}")
        same_kind = [r for r in records if r.kind == kind]
        renamed = [
            r.model_copy(
                update={"adapter_session_id": f"as-{run_id}-00000000", "task_id": f"bench-{run_id}-00000000"}
            )
            for r in same_kind
        ]
        if body != encode_telemetry_batch(renamed):
            raise AssertionError(f"generated {kind} envelope differs from encode_telemetry_batch")


@dataclass(frozen=True, slots=True)
class Published:
    messages: int
    records: int
    sessions: int
    bytes: int
    seconds: float

    @property
    def records_per_message(self) -> float:
        return self.records / self.messages

    @property
    def kib_per_message(self) -> float:
        return self.bytes / self.messages / 1024


async def publish_envelopes(
    amqp_url: str, topology: Topology, n_sessions: int, run_id: str, *, window: int = 64
) -> Published:
    """Declare the ingestor's queue and publish the sessions' envelopes to the telemetry exchange like a
    worker does (persistent, confirmed; ``window`` confirms in flight)."""
    check_envelopes(run_id)
    slots = asyncio.Semaphore(window)
    failures: list[BaseException] = []
    pending: set[asyncio.Task[None]] = set()
    messages = size = 0
    started = time.monotonic()
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_ingestor(channel)
        exchange = await topology.declare_telemetry(channel)

        async def one(kind: str, body: bytes, n: int) -> None:
            try:
                message = aio_pika.Message(
                    body,
                    message_id=f"bench-{run_id}-{n}",
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                confirm = await exchange.publish(message, routing_key=kind)
                if not isinstance(confirm, aiormq.spec.Basic.Ack):
                    failures.append(RuntimeError(f"broker answered {type(confirm).__name__}"))
            except Exception as exc:  # noqa: BLE001 - collected and re-raised below, after the others settle
                failures.append(exc)
            finally:
                slots.release()

        for kind, body in envelopes(n_sessions, run_id):
            await slots.acquire()
            if failures:
                break
            task = asyncio.create_task(one(kind, body, messages))
            pending.add(task)
            task.add_done_callback(pending.discard)
            messages += 1
            size += len(body)
        if pending:
            await asyncio.wait(set(pending))
    if failures:
        raise failures[0]
    return Published(messages, n_sessions * RECORDS_PER_SESSION, n_sessions, size, time.monotonic() - started)
