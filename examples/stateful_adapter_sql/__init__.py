"""A stateful Python adapter that keeps one SQLite connection open for the whole session."""

from examples.stateful_adapter_sql.adapter import SQLiteAgent

__all__ = ["SQLiteAgent"]
