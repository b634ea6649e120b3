"""Producer settings: one object, built in ``main`` and passed down."""

from __future__ import annotations

from pydantic import Field

from atlas_common import BrokerSettings
from schemas import MAX_MESSAGE_BYTES


class ProducerSettings(BrokerSettings):
    """Read from the environment (``AMQP_URL``, ``ATLAS_PREFIX`` ...); CLI flags override."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    publish_window: int = Field(default=1000, ge=1, le=65_535)
    """Publishes in flight awaiting their broker confirm."""
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=1024)
    connect_timeout_s: float = Field(default=10.0, gt=0)
