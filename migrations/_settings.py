"""Where to migrate, from the environment; built by the command, never at import."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class MigrateSettings(BaseSettings):
    """``database_url`` comes from ``DATABASE_URL`` (the same variable the services read)."""

    model_config = SettingsConfigDict(extra="ignore")

    # repr=False: settings objects end up in logs, and this URL may hold a password.
    database_url: str = Field(default=DEFAULT_DATABASE_URL, repr=False)
