"""Settings every service shares: where the broker is and how the topology is named."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import AfterValidator, Field, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from atlas_common._logging import LogFormat
from atlas_common._topology import Topology
from atlas_common._urls import check_amqp_url, check_database_url

AmqpUrl = Annotated[str, AfterValidator(check_amqp_url)]
"""An ``amqp://`` / ``amqps://`` URL aio-pika can connect with (checked when settings are built)."""

DatabaseUrl = Annotated[str, AfterValidator(check_database_url)]
"""A ``postgresql://`` URL asyncpg can read (checked when settings are built)."""

DEFAULT_DATABASE_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"

_SECRET_FIELD_WORDS: Final = ("url", "password", "secret", "token", "key", "dsn")
_MAX_INPUT_CHARS: Final = 80


class BrokerSettings(BaseSettings):
    """Base of each service's settings; each field reads the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", env_ignore_empty=True, populate_by_name=True
    )

    # repr=False: settings objects end up in logs, and a URL may hold a password.
    amqp_url: AmqpUrl = Field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
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


def settings_problems(err: ValidationError) -> list[str]:
    """One line per problem of a settings ``ValidationError``: which setting and what is wrong.

    pydantic's own text quotes every input value, a URL's password included; here a value is quoted only
    when its setting cannot hold a secret (a URL's own validator already shows it redacted)."""
    return [_problem(error) for error in err.errors(include_url=False)]


def _problem(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "settings"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    quotable = (
        bool(error["loc"])
        and error["type"] != "value_error"
        and isinstance(value, str | int | float)
        and not any(word in where.lower() for word in _SECRET_FIELD_WORDS)
    )
    if quotable:
        message += f" (got {str(value)[:_MAX_INPUT_CHARS]!r})"
    return f"{where}: {message}"
