"""Enqueue agent tasks to RabbitMQ: persistent, publisher-confirmed, pipelined, idempotent by task_id."""

from producer._demo import demo_tasks
from producer._errors import BrokerUnavailable, InvalidTaskLine, ProducerError, PublishRejected
from producer._lines import ParsedLines, content_task_id, parse_lines
from producer._producer import Producer, SubmitReport
from producer._settings import ProducerSettings

__all__ = [
    "BrokerUnavailable",
    "InvalidTaskLine",
    "ParsedLines",
    "Producer",
    "ProducerError",
    "ProducerSettings",
    "PublishRejected",
    "SubmitReport",
    "content_task_id",
    "demo_tasks",
    "parse_lines",
]
