"""Dead letters: look at them without losing any, and move chosen ones back into the pipeline.

Two dead-letter queues hold them (see :class:`atlas_common.Topology`): ``<prefix>.tasks.dead`` (tasks a
worker gave up on, and tasks the broker dead-lettered past the quorum ``x-delivery-limit``) and
``<prefix>.telemetry.dead`` (telemetry bodies the ingestor could not decode or store). A dead letter is
the original body plus the ``x-atlas-*`` headers of :func:`atlas_common.dead_letter_headers`; one the
broker dead-lettered carries the broker's ``x-first-death-*`` / ``x-death`` headers instead.

Reading never consumes: messages are fetched with ``basic.get`` without ack and all handed back at the
end (``basic.nack`` with requeue, or closing the channel). Requeueing publishes a copy with publisher
confirms and acks the dead letter only after the broker confirmed the copy: a failure at any point leaves
the dead letter where it was. The worst case (the process dies between the confirm and the ack) is a
copy in the pipeline AND the dead letter still in its queue; the worker's task ledger runs a task_id that
succeeded only once, so a second requeue of the same task does no harm.

Each read hands the messages back, which a quorum queue counts as a delivery. On RabbitMQ 3.x the
dead-letter queues have no delivery limit (none is declared), so reading them any number of times is safe.
RabbitMQ 4.x gives every quorum queue a default delivery limit of 20: there, declare the dead-letter queues
with ``x-delivery-limit: -1`` (or a policy) before reading them often.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage, FieldValue
from aio_pika.exceptions import DeliveryError

from atlas_common import (
    BROKER_ERRORS,
    DEAD_AT_HEADER,
    REASON_HEADER,
    RETRY_HEADER,
    ROUTING_KEY_HEADER,
    SOURCE_HEADER,
    TASK_ROUTING_KEY,
    PublishNotConfirmed,
    Topology,
    persistent_copy,
    publish_confirmed,
)
from producer._amqp import PASSIVE_MISSING, connect, queue_depth, throwaway_channel
from producer._errors import ProducerError

DeadQueue = Literal["tasks", "telemetry"]

PREVIEW_CHARS: Final = 80
_STRIPPED_PREFIXES: Final = ("x-atlas-", "x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_PUBLISH_CHUNK: Final = 256


class DeadLetterError(ProducerError):
    """The dead letters cannot be moved: the target exchange is missing, or similar."""


def dead_queue_name(topology: Topology, queue: DeadQueue) -> str:
    return topology.dead_tasks_queue if queue == "tasks" else topology.dead_telemetry_queue


@dataclass(frozen=True, slots=True)
class Death:
    """One entry of the broker's ``x-death`` header: where and why the broker dead-lettered it."""

    queue: str | None
    reason: str | None
    count: int | None
    time: str | None
    exchange: str | None
    routing_keys: list[str]


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """What one dead letter says about itself (headers and a body preview; the body is not decoded)."""

    message_id: str | None
    reason: str | None
    """``x-atlas-reason``: why the worker or ingestor dead-lettered it (None if the broker did)."""
    source: str | None
    """``x-atlas-source`` (``worker``, ``ingestor``), or ``broker`` for a broker dead-letter."""
    original_routing_key: str | None
    dead_at: str | None
    first_death_reason: str | None
    """``x-first-death-reason`` of a broker dead-letter: ``delivery_limit``, ``rejected``, ``expired``."""
    first_death_queue: str | None
    deaths: list[Death]
    retries: int | None
    body_size: int
    body_preview: str

    @property
    def broker_dead_lettered(self) -> bool:
        return self.first_death_reason is not None or bool(self.deaths)

    def reason_text(self) -> str:
        """The reason to show and match: the Atlas reason, else the broker's."""
        if self.reason is not None:
            return self.reason
        if self.first_death_reason is not None:
            where = f" in {self.first_death_queue}" if self.first_death_queue else ""
            return f"broker: {self.first_death_reason}{where}"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "reason": self.reason,
            "source": self.source,
            "original_routing_key": self.original_routing_key,
            "dead_at": self.dead_at,
            "first_death_reason": self.first_death_reason,
            "first_death_queue": self.first_death_queue,
            "x_death": [
                {
                    "queue": d.queue,
                    "reason": d.reason,
                    "count": d.count,
                    "time": d.time,
                    "exchange": d.exchange,
                    "routing_keys": d.routing_keys,
                }
                for d in self.deaths
            ],
            "retries": self.retries,
            "body_size": self.body_size,
            "body_preview": self.body_preview,
        }


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _deaths(value: object) -> list[Death]:
    if not isinstance(value, list | tuple):
        return []
    deaths: list[Death] = []
    for entry in value:
        if not isinstance(entry, Mapping):
            continue
        keys = entry.get("routing-keys")
        count = entry.get("count")
        deaths.append(
            Death(
                queue=_text(entry.get("queue")),
                reason=_text(entry.get("reason")),
                count=count if isinstance(count, int) else None,
                time=_text(entry.get("time")),
                exchange=_text(entry.get("exchange")),
                routing_keys=[k for k in (_text(k) for k in keys) if k is not None]
                if isinstance(keys, list | tuple)
                else [],
            )
        )
    return deaths


def describe(body: bytes, headers: Mapping[str, object] | None, message_id: str | None) -> DeadLetterInfo:
    """A dead letter's description from its body and headers (pure, so it is tested without a broker)."""
    h = headers or {}
    deaths = _deaths(h.get("x-death"))
    first_reason = _text(h.get("x-first-death-reason"))
    broker = first_reason is not None or bool(deaths)
    routing_key = _text(h.get(ROUTING_KEY_HEADER))
    if routing_key is None and deaths and deaths[-1].routing_keys:
        routing_key = deaths[-1].routing_keys[0]  # x-death lists the most recent death first
    dead_at = _text(h.get(DEAD_AT_HEADER))
    if dead_at is None and deaths:
        dead_at = deaths[0].time
    retries = h.get(RETRY_HEADER)
    return DeadLetterInfo(
        message_id=message_id,
        reason=_text(h.get(REASON_HEADER)),
        source=_text(h.get(SOURCE_HEADER)) or ("broker" if broker else None),
        original_routing_key=routing_key,
        dead_at=dead_at,
        first_death_reason=first_reason,
        first_death_queue=_text(h.get("x-first-death-queue")),
        deaths=deaths,
        retries=retries if isinstance(retries, int) and not isinstance(retries, bool) else None,
        body_size=len(body),
        body_preview=body[: PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:PREVIEW_CHARS],
    )


def requeue_headers(headers: Mapping[str, FieldValue] | None) -> dict[str, FieldValue]:
    """The headers a requeued message keeps: everything but the dead-letter, retry and broker-death ones."""
    return {k: v for k, v in (headers or {}).items() if not k.startswith(_STRIPPED_PREFIXES)}


@dataclass(frozen=True, slots=True)
class DeadLetterListing:
    queue: str
    present: bool
    depth: int
    """Messages ready in the queue when it was read (all of them are still there afterwards)."""
    letters: list[DeadLetterInfo]


async def list_dead_letters(
    amqp_url: str,
    topology: Topology,
    queue: DeadQueue = "tasks",
    *,
    limit: int = 50,
    connect_timeout_s: float = 10.0,
) -> DeadLetterListing:
    """Up to ``limit`` dead letters from the head of the queue, all left in the queue."""
    name, depth, letters = await _read(amqp_url, topology, queue, limit, connect_timeout_s)
    return DeadLetterListing(
        name, present=depth is not None, depth=depth or 0, letters=[info for info, _ in letters]
    )


async def read_dead_letters(
    amqp_url: str,
    topology: Topology,
    queue: DeadQueue = "tasks",
    *,
    limit: int = 10_000,
    connect_timeout_s: float = 10.0,
) -> list[tuple[DeadLetterInfo, bytes]]:
    """Up to ``limit`` dead letters with their bodies (for the audit), all left in the queue."""
    _, _, letters = await _read(amqp_url, topology, queue, limit, connect_timeout_s)
    return letters


async def _read(
    amqp_url: str, topology: Topology, queue: DeadQueue, limit: int, connect_timeout_s: float
) -> tuple[str, int | None, list[tuple[DeadLetterInfo, bytes]]]:
    """The queue's name, its depth (None: absent) and up to ``limit`` letters from its head, handed back."""
    name = dead_queue_name(topology, queue)
    connection = await connect(amqp_url, timeout_s=connect_timeout_s, name="atlas-producer-dead")
    try:
        async with throwaway_channel(connection) as channel:
            try:
                dlq = await channel.declare_queue(name, passive=True)
            except PASSIVE_MISSING:
                return name, None, []
            depth = dlq.declaration_result.message_count or 0
            letters: list[tuple[DeadLetterInfo, bytes]] = []
            held: list[AbstractIncomingMessage] = []
            try:
                while len(letters) < min(limit, depth):
                    message = await dlq.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    held.append(message)
                    info = describe(message.body, message.headers, message.message_id)
                    letters.append((info, message.body))
            finally:
                await _give_back(held)
            return name, depth, letters
    finally:
        await connection.close()


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters to requeue: all, by message_id, or by a piece of their reason (any case)."""

    all: bool = False
    ids: frozenset[str] = frozenset()
    reason_contains: str | None = None

    def __post_init__(self) -> None:
        chosen = sum((self.all, bool(self.ids), self.reason_contains is not None))
        if chosen != 1:
            raise ValueError("choose exactly one of: all, ids, reason_contains")

    def matches(self, info: DeadLetterInfo) -> bool:
        if self.all:
            return True
        if self.ids:
            return info.message_id in self.ids
        needle = (self.reason_contains or "").casefold()
        haystack = [info.reason or "", info.first_death_reason or "", info.reason_text()]
        return any(needle in text.casefold() for text in haystack)


@dataclass(frozen=True, slots=True)
class RequeueReport:
    queue: str
    dry_run: bool
    examined: int
    requeued: int
    """Moved back (or, with ``dry_run``, that would have been)."""
    left: int
    """Still in the dead-letter queue: not selected, or could not be moved (see ``failed``)."""
    failed: int
    requeued_ids: list[str | None] = field(default_factory=list)
    not_found_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "dry_run": self.dry_run,
            "examined": self.examined,
            "requeued": self.requeued,
            "left": self.left,
            "failed": self.failed,
            "requeued_ids": self.requeued_ids,
            "not_found_ids": self.not_found_ids,
            "errors": self.errors,
        }


async def requeue_dead_letters(
    amqp_url: str,
    topology: Topology,
    selection: Selection,
    queue: DeadQueue = "tasks",
    *,
    dry_run: bool = False,
    connect_timeout_s: float = 10.0,
) -> RequeueReport:
    """Move the selected dead letters back into the pipeline; the others stay where they are.

    Tasks go to the tasks exchange with routing key ``task``, without their ``x-atlas-*`` headers (so the
    worker gives them a full set of attempts again) and without the broker's death headers; message_id
    and the other properties are kept. Telemetry goes to the telemetry exchange with its original routing
    key. Every message in the queue when it starts is examined once; ``dry_run`` moves nothing.
    """
    name = dead_queue_name(topology, queue)
    connection = await connect(amqp_url, timeout_s=connect_timeout_s, name="atlas-producer-requeue")
    try:
        if await queue_depth(connection, name) is None:
            return RequeueReport(name, dry_run, 0, 0, 0, 0, not_found_ids=sorted(selection.ids))
        target_name = topology.tasks_exchange if queue == "tasks" else topology.telemetry_exchange
        await _require_exchange(connection, target_name)
        async with throwaway_channel(connection, publisher_confirms=True) as channel:
            dlq = await channel.declare_queue(name, passive=True)
            exchange = await channel.get_exchange(target_name, ensure=False)
            depth = dlq.declaration_result.message_count or 0
            return await _requeue(dlq, exchange, queue, selection, depth=depth, dry_run=dry_run)
    finally:
        await connection.close()


async def _require_exchange(connection: AbstractConnection, name: str) -> None:
    async with throwaway_channel(connection) as channel:
        try:
            await channel.get_exchange(name, ensure=True)
        except PASSIVE_MISSING:
            raise DeadLetterError(
                f"exchange {name} does not exist: start the workers (or the ingestor) once to declare it"
            ) from None


async def _requeue(
    dlq: aio_pika.abc.AbstractQueue,
    exchange: AbstractExchange,
    queue: DeadQueue,
    selection: Selection,
    *,
    depth: int,
    dry_run: bool,
) -> RequeueReport:
    held: list[AbstractIncomingMessage] = []
    chosen: list[tuple[AbstractIncomingMessage, DeadLetterInfo]] = []
    moved: list[str | None] = []
    errors: list[str] = []
    examined = 0
    try:
        # Every message fetched stays unacked (so basic.get never hands it out twice) until the end.
        while examined < depth:
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            examined += 1
            info = describe(message.body, message.headers, message.message_id)
            if selection.matches(info):
                chosen.append((message, info))
            else:
                held.append(message)
        if dry_run:
            held.extend(message for message, _ in chosen)
            moved = [info.message_id for _, info in chosen]
        else:
            for start in range(0, len(chosen), _PUBLISH_CHUNK):
                chunk = chosen[start : start + _PUBLISH_CHUNK]
                results = await asyncio.gather(
                    *(_republish(exchange, queue, message, info) for message, info in chunk),
                    return_exceptions=True,
                )
                for (message, info), result in zip(chunk, results, strict=True):
                    if isinstance(result, BaseException):
                        errors.append(f"{info.message_id or '<no message_id>'}: {result}")
                        held.append(message)
                    else:
                        await message.ack()  # only now: the copy is confirmed
                        moved.append(info.message_id)
    finally:
        await _give_back(held)
    found = {info.message_id for _, info in chosen}
    return RequeueReport(
        queue=dlq.name,
        dry_run=dry_run,
        examined=examined,
        requeued=len(moved),
        left=examined - len(moved),
        failed=len(errors),
        requeued_ids=moved,
        not_found_ids=sorted(selection.ids - {i for i in found if i is not None}),
        errors=errors,
    )


async def _republish(
    exchange: AbstractExchange, queue: DeadQueue, original: AbstractIncomingMessage, info: DeadLetterInfo
) -> None:
    if queue == "tasks":
        routing_key = TASK_ROUTING_KEY
    elif info.original_routing_key:
        routing_key = info.original_routing_key
    else:
        raise DeadLetterError("no original routing key (x-atlas-original-routing-key): left in place")
    copy = persistent_copy(original, headers=requeue_headers(original.headers))
    try:
        await publish_confirmed(exchange, copy, routing_key)
    except PublishNotConfirmed as exc:
        if isinstance(exc.__cause__, DeliveryError):
            raise DeadLetterError(f"unroutable: no queue bound to {exchange.name}/{routing_key}") from exc
        raise DeadLetterError(str(exc)) from exc


async def _give_back(messages: Iterable[AbstractIncomingMessage]) -> None:
    """Return unacked messages to their queue. If the channel is gone the broker already did that."""
    for message in messages:
        try:
            await message.nack(requeue=True)
        except BROKER_ERRORS:
            return
