"""The broker topology, declared idempotently by every service at start.

::

    producer --(task)--> [<p>.tasks  direct] --> <p>.tasks (quorum)  --> workers
                                ^                     |  x-delivery-limit exceeded (crash loop)
                                |                     v
    worker --(retry.<ms>)--> [<p>.retry direct] --> <p>.retry.<ms> (TTL) --dead-letter--+
    worker --(task)--------> [<p>.dead  direct] --> <p>.tasks.dead   (reason in headers)
    worker --(session.opened | step | session.closed)--> [<p>.telemetry topic]
                  --> <p>.telemetry.ingestor --> ingestors  (+ any queue a trainer binds)
    ingestor --(telemetry)--> [<p>.dead direct] --> <p>.telemetry.dead
    ingestor --(each session made final, its JSONL line)--> <p>.sessions (stream) --> trainers (feed)

Delay queues are one queue per backoff tier with a queue-wide TTL, so expiry is FIFO and no plugin is
needed; expired messages dead-letter back into the tasks exchange. With quorum queues (the default) the
tiers are quorum queues too (replicated, dead-lettering at least once), named ``<p>.retry.<ms>ms.q``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Final, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from atlas_common._broker import BROKER_ERRORS

TASK_ROUTING_KEY: Final = "task"
DEAD_TASK_ROUTING_KEY: Final = "task"
DEAD_TELEMETRY_ROUTING_KEY: Final = "telemetry"
TELEMETRY_ROUTING_KEYS: Final = ("session.opened", "step", "session.closed")
STREAM_PUBLISHED_MS_HEADER: Final = "atlas-published-ms"
"""Sessions stream: when the ingestor published the message (ms since the epoch); replay by time reads it."""
STREAM_FILE_HEADER: Final = "atlas-jsonl-file"
"""Sessions stream: the finalised JSONL file the session is in (once that file is final)."""
STREAM_SESSIONS_HEADER: Final = "atlas-sessions"
"""Sessions stream: how many JSONL lines (sessions) the message holds."""


@dataclass(frozen=True, slots=True)
class Topology:
    """Names and arguments of every exchange and queue, derived from a prefix and the retry policy."""

    prefix: str = "atlas"
    queue_type: Literal["quorum", "classic"] = "quorum"
    max_attempts: int = 3
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 300.0
    delivery_limit: int = 10

    @property
    def tasks_exchange(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def tasks_queue(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def retry_exchange(self) -> str:
        return f"{self.prefix}.retry"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_tasks_queue(self) -> str:
        return f"{self.prefix}.tasks.dead"

    @property
    def telemetry_exchange(self) -> str:
        return f"{self.prefix}.telemetry"

    @property
    def ingestor_queue(self) -> str:
        return f"{self.prefix}.telemetry.ingestor"

    @property
    def dead_telemetry_queue(self) -> str:
        return f"{self.prefix}.telemetry.dead"

    @property
    def sessions_stream(self) -> str:
        """The stream of complete sessions (one message per session, its JSONL line) trainers follow."""
        return f"{self.prefix}.sessions"

    def retry_delay_ms(self, attempt: int) -> int:
        """Backoff before attempt ``attempt + 1`` after attempt ``attempt`` failed (1-based, exponential)."""
        delay: float = min(self.retry_backoff_s * 2.0 ** (attempt - 1), self.retry_backoff_max_s)
        return max(1, round(delay * 1000))

    def retry_queue(self, delay_ms: int) -> str:
        """A retry tier (its routing key too). Quorum tiers have a name of their own (``.q``), so that a
        deployment whose classic tiers exist moves to replicated ones without redeclaring a queue with
        other arguments (which the broker refuses): the old tiers get no new messages and empty by
        themselves as their TTL expires."""
        suffix = ".q" if self.queue_type == "quorum" else ""
        return f"{self.prefix}.retry.{delay_ms}ms{suffix}"

    def retry_delays_ms(self) -> list[int]:
        return sorted({self.retry_delay_ms(a) for a in range(1, self.max_attempts)})

    def queue_names(self) -> list[str]:
        """Every queue this topology declares (for status output and for tearing a test run down)."""
        return [
            self.tasks_queue,
            *(self.retry_queue(d) for d in self.retry_delays_ms()),
            self.dead_tasks_queue,
            self.ingestor_queue,
            self.dead_telemetry_queue,
            self.sessions_stream,
        ]

    def exchange_names(self) -> list[str]:
        return [self.tasks_exchange, self.retry_exchange, self.dead_exchange, self.telemetry_exchange]

    async def delete(self, connection: AbstractConnection) -> None:
        """Delete every queue and exchange of this topology (missing ones are fine): for runs that used a
        prefix of their own. A channel per call, since a failed delete closes its channel."""
        for name in self.queue_names():
            channel = await connection.channel()
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.queue_delete(name)
        for name in self.exchange_names():
            channel = await connection.channel()
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.exchange_delete(name)

    def _durable_args(self) -> dict[str, aio_pika.abc.FieldValue]:
        return {"x-queue-type": self.queue_type}

    async def declare_dead_letters(self, channel: AbstractChannel) -> AbstractExchange:
        dead = await channel.declare_exchange(self.dead_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        tasks_dead = await channel.declare_queue(
            self.dead_tasks_queue, durable=True, arguments=self._durable_args()
        )
        await tasks_dead.bind(dead, DEAD_TASK_ROUTING_KEY)
        tel_dead = await channel.declare_queue(
            self.dead_telemetry_queue, durable=True, arguments=self._durable_args()
        )
        await tel_dead.bind(dead, DEAD_TELEMETRY_ROUTING_KEY)
        return dead

    async def declare_tasks(self, channel: AbstractChannel) -> tuple[AbstractExchange, AbstractQueue]:
        """Tasks exchange and queue, the retry tiers and the dead-letter queues."""
        await self.declare_dead_letters(channel)
        exchange = await channel.declare_exchange(
            self.tasks_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        args = self._durable_args()
        # A message that keeps killing its worker (so it is never acked nor rejected) would loop forever;
        # past delivery_limit the broker dead-letters it (quorum queues only: classic ones have no limit).
        args["x-dead-letter-exchange"] = self.dead_exchange
        args["x-dead-letter-routing-key"] = DEAD_TASK_ROUTING_KEY
        if self.queue_type == "quorum":
            args["x-delivery-limit"] = self.delivery_limit
        queue = await channel.declare_queue(self.tasks_queue, durable=True, arguments=args)
        await queue.bind(exchange, TASK_ROUTING_KEY)
        retry = await channel.declare_exchange(
            self.retry_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for delay_ms in self.retry_delays_ms():
            name = self.retry_queue(delay_ms)
            tier_args: dict[str, aio_pika.abc.FieldValue] = {
                "x-queue-type": self.queue_type,
                "x-message-ttl": delay_ms,
                "x-dead-letter-exchange": self.tasks_exchange,
                "x-dead-letter-routing-key": TASK_ROUTING_KEY,
            }
            if self.queue_type == "quorum":
                # Replicated like the tasks queue, so a tier survives the node it was declared on; and
                # expired messages are dead-lettered at least once (the default for quorum queues is at
                # most once: a leader change at that moment would lose the task). That strategy needs
                # the overflow behaviour reject-publish (RabbitMQ >= 3.10).
                tier_args["x-dead-letter-strategy"] = "at-least-once"
                tier_args["x-overflow"] = "reject-publish"
            tier = await channel.declare_queue(name, durable=True, arguments=tier_args)
            await tier.bind(retry, name)
        return exchange, queue

    async def declare_telemetry(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.telemetry_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def declare_ingestor(self, channel: AbstractChannel) -> AbstractQueue:
        """The telemetry exchange, the ingestor's durable queue bound to every telemetry key, the DLQs."""
        await self.declare_dead_letters(channel)
        exchange = await self.declare_telemetry(channel)
        queue = await channel.declare_queue(self.ingestor_queue, durable=True, arguments=self._durable_args())
        for key in TELEMETRY_ROUTING_KEYS:
            await queue.bind(exchange, key)
        return queue

    async def declare_sessions_stream(
        self, channel: AbstractChannel, *, max_age_s: int, max_bytes: int
    ) -> AbstractQueue:
        """The sessions stream, with retention by age and by size (whichever comes first; RabbitMQ drops
        whole segments). Where the stream exists with other retention the broker refuses the declaration
        (PRECONDITION_FAILED, the channel closes): queue arguments cannot change after the declaration,
        a policy can; the caller then uses the stream as it is."""
        arguments: dict[str, aio_pika.abc.FieldValue] = {
            "x-queue-type": "stream",
            "x-max-age": f"{max_age_s}s",
            "x-max-length-bytes": max_bytes,
        }
        return await channel.declare_queue(self.sessions_stream, durable=True, arguments=arguments)
