"""``SQLiteAgent``: each session gets its own in-memory database that lives across the session's steps.

Load it with ``PythonAdapter("examples.stateful_adapter_sql.adapter:SQLiteAgent")``: because the target is
a class, every session gets a new ``SQLiteAgent`` (and so a new database); ``on_open`` creates the
database, ``on_step`` runs the step's prompt as one SQL statement, ``on_close`` closes the connection.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

from worker import SessionContext

SEED_TITLES: Final = ("Atlas SDK", "Continual Learning", "Stateful Sessions")


class SQLiteAgent:
    """An agent whose 'tool' is a SQL database; the prompt of each step is the query to run."""

    name = "sqlite-agent"

    def __init__(self) -> None:
        self.connection: sqlite3.Connection | None = None
        self.queries = 0
        self.rows_returned = 0

    def on_open(self, context: SessionContext) -> dict[str, Any]:
        self.connection = sqlite3.connect(":memory:")
        with self.connection:
            self.connection.execute("CREATE TABLE documents (id INTEGER PRIMARY KEY, title TEXT NOT NULL)")
            self.connection.executemany(
                "INSERT INTO documents (title) VALUES (?)", [(t,) for t in SEED_TITLES]
            )
        return {"database": ":memory:", "seed_rows": len(SEED_TITLES), "task_id": context.task_id}

    def on_step(self, prompt: str) -> dict[str, Any]:
        if self.connection is None:
            raise RuntimeError("on_step called before on_open")
        with self.connection:  # commits the statement (or rolls it back if it fails)
            cursor = self.connection.execute(prompt)
            rows = cursor.fetchall()
        self.queries += 1
        if cursor.description is None:  # INSERT/UPDATE/DDL: no result set
            count = max(cursor.rowcount, 0)
            content: Any = f"OK, {count} row(s) changed"
        elif len(cursor.description) == 1:
            count = len(rows)
            content = "\n".join(str(row[0]) for row in rows)
        else:
            count = len(rows)
            content = [list(row) for row in rows]
        self.rows_returned += len(rows)
        prompt_tokens = len(prompt.split())
        completion_tokens = len(str(content).split())
        return {
            "content": content,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "events": [{"type": "sql", "query": prompt, "rows": count}],
        }

    def on_close(self, reason: str | None = None) -> dict[str, Any]:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        return {"queries": self.queries, "rows_returned": self.rows_returned, "clean": reason is None}
