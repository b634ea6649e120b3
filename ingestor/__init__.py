"""atlas-pipeline's ingestor: adapter-session telemetry from RabbitMQ into the Atlas Postgres tables and
rolling JSONL files for training jobs, exactly once even under SIGKILL.

Run ``atlas-ingestor`` (``python -m ingestor [run]``), or ``atlas-ingestor export --since ISO8601
[--until ISO8601] --out FILE [--force]``; embed it with ``await Ingestor(IngestorSettings()).run(stop)``;
retention is ``atlas-ingestor prune --before ISO8601`` or ``await prune_sessions(settings, before=...)``.

What it does, in short (details in the module docstrings):

- It applies no migration: at start it checks that migrations up to ``007_accountability`` are applied and
  exits with status 2 ("run atlas-migrate") otherwise, so schema changes stay one deliberate step.
- It binds its durable queue (``Topology.declare_ingestor``) and consumes with ``prefetch`` (default twice
  ``batch_max_messages``); a batch is written when it has ``batch_max_messages`` messages or is
  ``flush_interval_s`` old. One Postgres transaction per batch, set-based statements only (``_sql``).
- The batch is acked (``multiple=True`` on its last delivery) only after Postgres committed it AND the
  sessions it completed were appended to the open JSONL file and fsynced.
- Undecodable bodies go, untouched, to the dead exchange with ``dead_letter_headers`` (publisher
  confirmed); rows Postgres refuses (e.g. NUL characters) are isolated by bisecting the batch and
  dead-lettered with the database error. Dead letters are at-least-once: a crash between the dead-letter
  publish and the ack publishes that dead letter again on redelivery.
- Postgres down: the batch is held and retried with capped exponential backoff, nothing is acked, so the
  broker stops at ``prefetch`` unacked deliveries; it resumes by itself. A dropped broker channel
  discards the in-memory batch (redelivered; every write is idempotent).
- Tables end up exactly as one in-order delivery would leave them, whatever duplication, order or number
  of ingestors (``_rows``, ``_sql``): per-task transaction locks and session row locks in sorted order.
- A ``running`` session superseded by a higher attempt of its task becomes ``abandoned`` (per batch and by
  a periodic sweep). Abandoned sessions - by that rule or by their own close - are NOT exported to JSONL:
  they are incomplete trajectories. Only closed ``succeeded``/``failed`` sessions with all their steps
  (and their opened) are exported, each exactly once; the argument is in ``ingestor._jsonl``.
- All ingestors of one deployment share one ``jsonl_dir`` (a recoverer finishes a dead ingestor's file
  there). Files: ``sessions-<UTC time>-<ingestor_id>-<n>.jsonl[.gz|.zst]``; hidden ``.*.tmp`` files are
  work in progress. A session's line is built from Postgres by one function (``_lines.build_line``) for
  the rolling files, recovery and ``export``, so they are byte-identical.
"""

from ingestor._errors import ConfigError, IngestorError
from ingestor._export import export_sessions
from ingestor._files import is_final_name, read_lines
from ingestor._lines import build_line
from ingestor._prune import Pruned, prune_sessions
from ingestor._service import Ingestor
from ingestor._settings import IngestorSettings
from ingestor._store import fetch_line_map

__all__ = [
    "ConfigError",
    "Ingestor",
    "IngestorError",
    "IngestorSettings",
    "Pruned",
    "build_line",
    "export_sessions",
    "fetch_line_map",
    "is_final_name",
    "prune_sessions",
    "read_lines",
]
