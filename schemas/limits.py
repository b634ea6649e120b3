"""Every limit of the wire contract, in one place (the README's "Limits" table is this module).

The limits exist because of what stores the data downstream: a RabbitMQ message the ingestor accepts,
PostgreSQL ``text`` / ``jsonb`` / ``integer`` columns, and the orjson encoder that writes JSONL lines. The
worker applies :func:`schemas.storable` to every record it publishes, so it never publishes what the
ingestor or PostgreSQL would refuse; decoders refuse what breaks the limits below.
"""

from __future__ import annotations

from typing import Final

MAX_MESSAGE_BYTES: Final = 1024 * 1024
"""One AMQP body (a task, or a telemetry envelope); decoders refuse a larger one before parsing it."""

MAX_RECORD_BYTES: Final = MAX_MESSAGE_BYTES - 4096
"""One encoded telemetry record. The worker shrinks a larger one (:func:`schemas.storable`), and a
telemetry envelope never grows past ``MAX_MESSAGE_BYTES`` (the envelope's own bytes fit in the rest)."""

MAX_TASK_BYTES: Final = 896 * 1024
"""One encoded task message. The ``session.opened`` record carries the task and its metadata, so a task
must leave room in a record for the adapter's own session metadata."""

MAX_TASK_CHARS: Final = 200_000
"""Characters of a task's text (and of a step description)."""

MAX_TRACE_CHARS: Final = 1_000_000
"""Characters of a step trace and of a final answer (both are also bounded by ``MAX_RECORD_BYTES``)."""

MAX_REASON_CHARS: Final = 20_000
"""Characters of a failure reason (a step's error, a close's reason)."""

MAX_JSON_DEPTH: Final = 64
"""Nesting levels of any free JSON value (task metadata, outputs, events, plans, adapter metadata).
A task deeper than this is refused; a deeper value an adapter returns is stored by the rule below."""

MIN_JSON_INT: Final = -(2**63)
MAX_JSON_INT: Final = 2**64 - 1
"""The range of an integer inside a free JSON value: 64 bits, what the JSONL encoder (orjson) writes."""

MAX_COUNT: Final = 2**53 - 1
"""Largest token count or call count (exact in every JSON reader, JavaScript's included)."""

MAX_INT4: Final = 2**31 - 1
"""Largest ``seq``, ``step_id``, ``steps``, ``attempt(s)``: PostgreSQL ``integer`` columns."""

MAX_SESSION_EVENTS: Final = 50
"""Adapter events kept in a close's session aggregate: the newest ones, as the Atlas SDK keeps them
(every event stays in its own step record)."""

SHRINK_PREVIEW_CHARS: Final = 2000
"""Characters of JSON text kept as a ``preview`` when an object field is too large to keep."""

MAX_CONTEXT_RESULTS: Final = 8
"""Prior steps a JSONL step record's ``context`` lists (the newest ones; older ones are only counted), so
a long session's line grows linearly with its steps, not quadratically."""

MAX_CONTEXT_RESULT_CHARS: Final = 2000
"""Characters of one prior step's output in a JSONL step record's ``context`` (cut with the truncation
marker; the whole output is in that step's own record)."""
