"""The ingestor's errors, grouped by what the caller does about them.

- :class:`ConfigError`: the process cannot run as configured (schema missing, bad setting); exit non-zero.
- :class:`TransientError`: hold the batch, back off, retry; nothing is acked meanwhile.
- :class:`FileSuperseded`: a recoverer finalized the file this ingestor was filling; take a new file and
  retry the batch transaction.
- :class:`ShutdownDeadline`: shutting down and the grace period is over; drop the held batch unacked (the
  broker redelivers it).
- ``atlas_common.BrokerUnavailable``: the channel is gone; drop the batch unacked (redelivered after the
  reconnect).
- :class:`RecordsRejected`: these records cannot be stored (they do not fit their session, or storage
  refuses them): dead-letter them with their reasons, note them in ``telemetry_problems``, write the rest.
- :class:`MessageRejected`: Postgres refused the batch's data and the culprit is not known: bisect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingestor._batch import Problem, RecordKey


class IngestorError(Exception):
    """Root of every error the ingestor raises on purpose."""


class ConfigError(IngestorError):
    """The process cannot run as configured; the message says what to fix."""


class TransientError(IngestorError):
    """A dependency is failing for now (Postgres down, disk full): retry later."""


class DatabaseUnavailable(TransientError):
    """Postgres refused or dropped the connection, or timed out."""


class JsonlWriteError(TransientError):
    """Appending to or finalizing a JSONL file failed (an OSError underneath)."""


class FileSuperseded(IngestorError):
    """The open JSONL file was finalized by a recoverer; switch to a new file and retry."""


class ShutdownDeadline(IngestorError):
    """The shutdown grace period ran out while a batch was held."""


class MessageRejected(IngestorError):
    """Postgres refused the data itself (not the connection): bisect the batch, dead-letter the culprit."""

    def __init__(self, reason: str, sqlstate: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate


class RecordsRejected(IngestorError):
    """Records of the batch that cannot be stored, each with its reason; the rest of the batch can be."""

    def __init__(self, problems: dict[RecordKey, Problem]) -> None:
        super().__init__(f"{len(problems)} record(s) cannot be stored")
        self.problems = problems
