"""Enqueue agent tasks to RabbitMQ: persistent, publisher-confirmed, pipelined, idempotent by task_id.

Also the operator's view of a running pipeline: :func:`collect_status` (``python -m producer status``),
:func:`run_audit` (``python -m producer audit``: is every succeeded task stored and exported?) and the
dead-letter tools :func:`list_dead_letters` / :func:`requeue_dead_letters`
(``python -m producer dead list|requeue``).
"""

from atlas_common import BrokerUnavailable
from producer._audit import AuditReport, Finding, run_audit
from producer._deadletters import (
    DeadLetterError,
    DeadLetterInfo,
    DeadLetterListing,
    RequeueReport,
    Selection,
    list_dead_letters,
    requeue_dead_letters,
)
from producer._demo import demo_tasks
from producer._errors import InvalidTaskLine, ProducerError, PublishRejected
from producer._lines import ParsedLines, content_task_id, parse_lines
from producer._producer import Producer, SubmitReport
from producer._settings import ProducerSettings
from producer._status import PipelineStatus, collect_status

__all__ = [
    "AuditReport",
    "BrokerUnavailable",
    "DeadLetterError",
    "DeadLetterInfo",
    "DeadLetterListing",
    "Finding",
    "InvalidTaskLine",
    "ParsedLines",
    "PipelineStatus",
    "Producer",
    "ProducerError",
    "ProducerSettings",
    "PublishRejected",
    "RequeueReport",
    "Selection",
    "SubmitReport",
    "collect_status",
    "content_task_id",
    "demo_tasks",
    "list_dead_letters",
    "parse_lines",
    "requeue_dead_letters",
    "run_audit",
]
