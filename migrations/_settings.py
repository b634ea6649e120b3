"""Where to migrate, from the environment; built by the command, never at import."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atlas_common import DEFAULT_DATABASE_URL, DatabaseUrl

__all__ = ["DEFAULT_DATABASE_URL", "MigrateSettings"]


class MigrateSettings(BaseSettings):
    """``database_url`` comes from ``DATABASE_URL`` (the same variable the services read)."""

    model_config = SettingsConfigDict(extra="ignore")

    # repr=False: settings objects end up in logs, and this URL may hold a password.
    database_url: DatabaseUrl = Field(default=DEFAULT_DATABASE_URL, repr=False)
