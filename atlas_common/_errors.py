"""The errors every service shares, grouped by how the caller reacts (as Dramatiq's ``errors.py``)."""

from __future__ import annotations


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be reached, or the connection or channel went away: what was in flight is not
    acked (the broker redelivers it); reconnect with backoff, or fail at start-up."""


class PublishNotConfirmed(BrokerUnavailable):
    """The broker did not confirm a publish (nack, unroutable, timeout, channel gone): the message may not
    be enqueued, so whatever depended on it must not be acked."""
