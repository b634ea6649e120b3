"""Settings every service shares: where the broker is and how the topology is named."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atlas_common._logging import LogFormat
from atlas_common._topology import Topology


class BrokerSettings(BaseSettings):
    """Base of each service's settings; each field reads the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", env_ignore_empty=True, populate_by_name=True
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    prefix: str = Field(default="atlas", pattern=r"^[A-Za-z0-9_.-]+$", validation_alias="ATLAS_PREFIX")
    queue_type: Literal["quorum", "classic"] = Field(default="quorum", validation_alias="ATLAS_QUEUE_TYPE")
    max_attempts: int = Field(default=3, ge=1, le=20, validation_alias="ATLAS_MAX_ATTEMPTS")
    retry_backoff_s: float = Field(default=1.0, gt=0, validation_alias="ATLAS_RETRY_BACKOFF_S")
    retry_backoff_max_s: float = Field(default=300.0, gt=0, validation_alias="ATLAS_RETRY_BACKOFF_MAX_S")
    delivery_limit: int = Field(default=10, ge=2, validation_alias="ATLAS_DELIVERY_LIMIT")
    log_level: str = "INFO"
    log_format: LogFormat = "auto"

    def topology(self) -> Topology:
        return Topology(
            prefix=self.prefix,
            queue_type=self.queue_type,
            max_attempts=self.max_attempts,
            retry_backoff_s=self.retry_backoff_s,
            retry_backoff_max_s=self.retry_backoff_max_s,
            delivery_limit=self.delivery_limit,
        )
