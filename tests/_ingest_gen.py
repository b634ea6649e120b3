"""Test data for the ingestor: realistic sessions as schemas models, broken bodies, and a publisher."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aio_pika
import orjson

from atlas_common import Topology
from schemas import (
    Phase,
    SessionClosed,
    SessionOpened,
    SessionStatus,
    StepRecorded,
    TelemetryMessage,
    Usage,
    encode,
    encode_telemetry_batch,
)

BASE_TIME = datetime(2026, 11, 25, 9, 0, 0, tzinfo=UTC)


@dataclass
class GenSession:
    """One adapter session as a worker would report it (``closed`` is None for a killed attempt)."""

    adapter_session_id: str
    task_id: str
    attempt: int
    opened: SessionOpened
    steps: list[StepRecorded]
    closed: SessionClosed | None

    @property
    def messages(self) -> list[TelemetryMessage]:
        out: list[TelemetryMessage] = [self.opened, *self.steps]
        if self.closed is not None:
            out.append(self.closed)
        return out


@dataclass
class Generated:
    sessions: list[GenSession] = field(default_factory=list)

    def in_order(self) -> list[TelemetryMessage]:
        """Every message in one in-order delivery: sessions by open time, each session by seq."""
        ordered = sorted(self.sessions, key=lambda s: (s.opened.opened_at, s.adapter_session_id))
        return [m for s in ordered for m in s.messages]

    def expected_status(self) -> dict[str, str]:
        """Independent of the ingestor: the close status, else abandoned if a later attempt exists."""
        latest: dict[str, tuple[int, datetime]] = {}
        for s in self.sessions:
            key = (s.attempt, s.opened.opened_at)
            latest[s.task_id] = max(latest.get(s.task_id, key), key)
        out: dict[str, str] = {}
        for s in self.sessions:
            if s.closed is not None:
                out[s.adapter_session_id] = s.closed.status
            elif latest[s.task_id] > (s.attempt, s.opened.opened_at):
                out[s.adapter_session_id] = "abandoned"
            else:
                out[s.adapter_session_id] = "running"
        return out

    def exported(self) -> set[str]:
        """Sessions that must appear in the JSONL exactly once: closed succeeded|failed."""
        return {
            s.adapter_session_id
            for s in self.sessions
            if s.closed is not None and s.closed.status in ("succeeded", "failed")
        }


def _session(rng: random.Random, task_id: str, attempt: int, t0: datetime, *, killed: bool) -> GenSession:
    asid = f"as-{uuid.UUID(int=rng.getrandbits(128)).hex}"
    k = rng.randint(1, 4)
    plan = {"steps": [{"id": i, "description": f"do part {i}", "depends_on": []} for i in range(1, k + 1)]}
    opened = SessionOpened(
        adapter_session_id=asid,
        task_id=task_id,
        adapter="fake",
        task=f"task {task_id}: sum {k} numbers",
        execution_mode=rng.choice(["stepwise", "single_shot"]),
        attempt=attempt,
        metadata={"model": "fake-1", "temperature": 0.0},
        task_metadata={"source": "test", "n": k},
        opened_at=t0,
        emitted_at=t0,
    )
    steps: list[StepRecorded] = []
    total = Usage()
    all_events: list[dict[str, object]] = []
    specs: list[tuple[int, Phase, str, object]] = [(0, "plan", "make a plan", plan)]
    specs += [
        (i, "execute", f"do part {i}", rng.choice([f"result {i}", {"value": i}, [i, i], None]))
        for i in range(1, k + 1)
    ]
    specs.append((k + 1, "synthesize", "answer", f"answer {task_id}"))
    t = t0
    for seq, (step_id, phase, desc, output) in enumerate(specs, start=1):
        usage = Usage(prompt_tokens=10 * seq, completion_tokens=seq, total_tokens=11 * seq, calls=1)
        events = [{"type": "tool_call", "name": f"tool{seq}", "seq": seq}] if rng.random() < 0.5 else []
        start, t = t, t + timedelta(milliseconds=rng.randint(1, 900))
        steps.append(
            StepRecorded(
                adapter_session_id=asid,
                task_id=task_id,
                seq=seq,
                step_id=step_id,
                phase=phase,
                description=desc,
                output=output,
                trace=f"trace {asid} {seq}",
                usage=usage,
                events=events,
                started_at=start,
                finished_at=t,
                emitted_at=t,
                attempts=rng.choice([1, 1, 2]),
            )
        )
        total += usage
        all_events.extend(events)
    if killed:
        return GenSession(asid, task_id, attempt, opened, steps[: rng.randint(0, len(steps))], None)
    statuses: list[SessionStatus] = ["succeeded", "failed", "abandoned"]
    status = rng.choices(statuses, weights=[75, 15, 10])[0]
    t += timedelta(milliseconds=5)
    closed = SessionClosed(
        adapter_session_id=asid,
        task_id=task_id,
        seq=len(steps) + 1,
        status=status,
        reason=None if status == "succeeded" else f"{status} on purpose",
        final_answer=f"answer {task_id}" if status == "succeeded" else "",
        plan=plan,
        totals=total,
        events=all_events,
        close_metadata={"worker": "w1"},
        steps=len(steps),
        closed_at=t,
        emitted_at=t,
    )
    return GenSession(asid, task_id, attempt, opened, steps, closed)


def generate(n_sessions: int, *, seed: int = 7, retry_share: float = 0.15) -> Generated:
    """``n_sessions`` sessions; ``retry_share`` of tasks first had an attempt whose worker was killed."""
    rng = random.Random(seed)
    gen = Generated()
    t = BASE_TIME + timedelta(seconds=seed)
    while len(gen.sessions) < n_sessions:
        task_id = f"task-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}"
        attempt = 1
        if rng.random() < retry_share and len(gen.sessions) + 1 < n_sessions:
            gen.sessions.append(_session(rng, task_id, attempt, t, killed=True))
            attempt += 1
            t += timedelta(seconds=1)
        gen.sessions.append(_session(rng, task_id, attempt, t, killed=False))
        t += timedelta(seconds=1)
    return gen


INVALID_BODIES: list[bytes] = [
    b"this is not json",
    b"[1, 2, 3]",
    orjson.dumps({"kind": "step", "adapter_session_id": "x"}),
    orjson.dumps(
        {
            "schema_version": 99,
            "kind": "session.opened",
            "adapter_session_id": "as-v99",
            "task_id": "t",
            "seq": 0,
            "adapter": "fake",
            "task": "x",
        }
    ),
]


BAD_RECORD: dict[str, object] = {"kind": "step", "adapter_session_id": "as-bad", "task_id": "t", "seq": 1}
"""A record that fails validation inside an otherwise good envelope: dead-lettered as its own JSON."""


def bodies(
    messages: Iterable[TelemetryMessage],
    *,
    rng: random.Random | None = None,
    duplicate_share: float = 0.0,
    invalid: Sequence[bytes] = (),
    bad_records: Sequence[dict[str, object]] = (),
    envelope_max: int = 20,
) -> list[tuple[str, bytes, str]]:
    """``(routing_key, body, message_id)`` AMQP messages as workers send them: records (duplicated and
    shuffled when ``rng`` is given) coalesced into envelopes of one kind, some sent as bare records."""
    records = list(messages)
    pick = rng or random.Random(0)
    if rng is not None:
        records += [rng.choice(records) for _ in range(int(len(records) * duplicate_share))]
        rng.shuffle(records)
    out: list[tuple[str, bytes, str]] = []
    i = 0
    while i < len(records):
        group = [records[i]]
        size = pick.randint(1, envelope_max)
        i += 1
        while i < len(records) and len(group) < size and records[i].kind == group[0].kind:
            group.append(records[i])
            i += 1
        if len(group) == 1 and pick.random() < 0.5:
            out.append((group[0].kind, encode(group[0]), f"{group[0].adapter_session_id}:{group[0].seq}"))
        else:
            out.append((group[0].kind, encode_telemetry_batch(group), f"batch-{len(out)}"))
    out += [("step", body, f"bad-{n}") for n, body in enumerate(invalid)]
    for n, bad in enumerate(bad_records):
        envelope = {"schema_version": 1, "kind": "step", "records": [records[0].model_dump(mode="json"), bad]}
        out.append(("step", orjson.dumps(envelope), f"bad-record-{n}"))
    if rng is not None:
        rng.shuffle(out)
    return out


async def publish(amqp_url: str, topology: Topology, items: Sequence[tuple[str, bytes, str]]) -> None:
    """Publish like a worker does: persistent, confirmed, to the telemetry exchange."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_ingestor(channel)
        exchange = await topology.declare_telemetry(channel)
        for start in range(0, len(items), 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            message_id=mid,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            content_type="application/json",
                        ),
                        routing_key=key,
                    )
                    for key, body, mid in items[start : start + 500]
                )
            )
    finally:
        await connection.close()
