"""The feed's settings: ``FEED_*`` (plus the shared ``AMQP_URL`` and ``ATLAS_PREFIX``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from atlas_common import BrokerSettings


class FeedSettings(BrokerSettings):
    """How a trainer follows the feed: ``FEED_CURSOR_DIR``, ``FEED_DEDUP_WINDOW``, ``FEED_PREFETCH``,
    ``FEED_POLL_INTERVAL_S``; the broker and prefix are the shared ``AMQP_URL`` and ``ATLAS_PREFIX``."""

    model_config = SettingsConfigDict(env_prefix="FEED_", validate_by_name=True, validate_by_alias=True)

    cursor_dir: Path = Path("var/feed")
    """Where named consumers keep their cursors (one file each)."""
    dedup_window: int = Field(default=100_000, ge=1)
    """Session ids remembered to hide the stream's duplicates (the ingestor republishes at most the
    sessions of the file it was filling when it crashed: keep this above a file's session count)."""
    prefetch: int = Field(default=256, ge=1, le=65_535)
    """Stream messages the broker sends ahead of the consumer."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    """How often the file follower looks for newly finalised files once it has read them all."""
