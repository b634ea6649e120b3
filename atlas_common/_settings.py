"""Settings every service shares: where the broker is and how the topology is named."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from pydantic import AfterValidator, AliasChoices, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from atlas_common._logging import LogFormat
from atlas_common._topology import Topology
from atlas_common._urls import check_amqp_url, check_database_url

S = TypeVar("S", bound=BaseSettings)

AmqpUrl = Annotated[str, AfterValidator(check_amqp_url)]
"""An ``amqp://`` / ``amqps://`` URL aio-pika can connect with (checked when settings are built)."""

DatabaseUrl = Annotated[str, AfterValidator(check_database_url)]
"""A ``postgresql://`` URL asyncpg can read (checked when settings are built)."""

DEFAULT_DATABASE_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"

_SECRET_FIELD_WORDS: Final = ("url", "password", "secret", "token", "key", "dsn")
_MAX_INPUT_CHARS: Final = 80


class LegacyEnv(PydanticBaseSettingsSource):
    """Reads the unprefixed names a service's variables had before it got its own prefix
    (``JSONL_DIR`` for ``INGESTOR_JSONL_DIR``), with a warning naming the new one; the new name wins."""

    def __init__(self, settings_cls: type[BaseSettings], prefix: str) -> None:
        super().__init__(settings_cls)
        self._prefix = prefix

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        old = field_name.upper()
        value = os.environ.get(old) or None
        if field.validation_alias is not None or value is None or f"{self._prefix}{old}" in os.environ:
            return None, old, False
        return value, old, self.field_is_complex(field)

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, old, complex_value = self.get_field_value(field, name)
            if value is None:
                continue
            warnings.warn(
                f"environment variable {old} is deprecated: use {self._prefix}{old}",
                FutureWarning,
                stacklevel=1,
            )
            found[name] = self.decode_complex_value(name, field, value) if complex_value else value
        return found


class BrokerSettings(BaseSettings):
    """Base of each service's settings. Shared variables have fixed names (``AMQP_URL``, ``DATABASE_URL``,
    ``ATLAS_*``, ``LOG_*``); a service's own read ``<PREFIX>_<NAME>`` (its ``env_prefix``). A service whose
    variables were unprefixed before it got its prefix sets ``legacy_unprefixed_env`` so that the old names
    still work with a deprecation warning (:class:`LegacyEnv`)."""

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", env_ignore_empty=True, populate_by_name=True
    )

    legacy_unprefixed_env: ClassVar[bool] = False
    """Also read each own setting under its bare name (``JSONL_DIR``), with a warning. Opt-in: a service
    that never read bare names must not start picking up ``CONCURRENCY`` or ``PREFETCH`` meant for
    something else."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        prefix = str(cls.model_config.get("env_prefix") or "")
        legacy = (LegacyEnv(settings_cls, prefix),) if prefix and cls.legacy_unprefixed_env else ()
        return (init_settings, env_settings, *legacy, dotenv_settings, file_secret_settings)

    # repr=False: settings objects end up in logs, and a URL may hold a password.
    amqp_url: AmqpUrl = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        repr=False,
        validation_alias=AliasChoices("AMQP_URL", "AMQP_URLS"),
    )
    """One broker URL, or a cluster's nodes as a comma-separated list of URLs (``AMQP_URLS`` works too)."""
    prefix: str = Field(default="atlas", pattern=r"^[A-Za-z0-9_.-]+$", validation_alias="ATLAS_PREFIX")
    queue_type: Literal["quorum", "classic"] = Field(default="quorum", validation_alias="ATLAS_QUEUE_TYPE")
    max_attempts: int = Field(default=3, ge=1, le=20, validation_alias="ATLAS_MAX_ATTEMPTS")
    retry_backoff_s: float = Field(default=1.0, gt=0, validation_alias="ATLAS_RETRY_BACKOFF_S")
    retry_backoff_max_s: float = Field(default=300.0, gt=0, validation_alias="ATLAS_RETRY_BACKOFF_MAX_S")
    delivery_limit: int = Field(default=10, ge=2, validation_alias="ATLAS_DELIVERY_LIMIT")
    log_level: str = Field(default="INFO", validation_alias="LOG_LEVEL")
    log_format: LogFormat = Field(default="auto", validation_alias="LOG_FORMAT")

    def topology(self) -> Topology:
        return Topology(
            prefix=self.prefix,
            queue_type=self.queue_type,
            max_attempts=self.max_attempts,
            retry_backoff_s=self.retry_backoff_s,
            retry_backoff_max_s=self.retry_backoff_max_s,
            delivery_limit=self.delivery_limit,
        )


def load_settings(build: Callable[[], S]) -> S | None:
    """``build()`` (a settings object from the environment and flags), or None after one ``error:`` line
    per problem on stderr: what every command prints for bad settings before exiting with status 2.
    pydantic's own text would quote the values, a URL's password included (:func:`settings_problems`)."""
    try:
        return build()
    except ValidationError as err:
        sys.stderr.write("".join(f"error: {problem}\n" for problem in settings_problems(err)))
        return None


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
