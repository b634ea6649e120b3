"""Producer errors, grouped by how a caller reacts."""

from __future__ import annotations


class ProducerError(Exception):
    """Root of every error the producer raises."""


class PublishRejected(ProducerError):
    """The broker did not take a message (nack, unroutable, channel closed); the task was not enqueued."""

    def __init__(self, task_id: str, detail: str) -> None:
        super().__init__(f"task {task_id!r} was not enqueued: {detail}")
        self.task_id = task_id


class InvalidTaskLine(ProducerError):
    """A JSONL line that is not a valid task."""

    def __init__(self, line_no: int, detail: str) -> None:
        super().__init__(f"line {line_no}: {detail}")
        self.line_no = line_no
        self.detail = detail
