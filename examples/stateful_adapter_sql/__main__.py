"""``python -m examples.stateful_adapter_sql``: run one session of the SQLite agent and print its steps."""

from __future__ import annotations

import asyncio
import sys

from schemas import Usage
from worker import PythonAdapter, SessionContext

STATEMENTS = (
    "SELECT title FROM documents ORDER BY id",
    "INSERT INTO documents (title) VALUES ('Telemetry Pipelines')",
    "SELECT id, title FROM documents WHERE title LIKE '%Pipelines%'",
    "SELECT COUNT(*) FROM documents",
)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


async def main() -> None:
    adapter = PythonAdapter("examples.stateful_adapter_sql.adapter:SQLiteAgent")
    total = Usage()
    async with adapter.session(SessionContext(task_id="sql-demo", execution_mode="stepwise")) as session:
        _say(f"session {session.session_id} opened: {session.metadata}")
        for number, statement in enumerate(STATEMENTS, start=1):
            outcome = await session.step(statement)
            total = total + outcome.usage
            _say(f"\nstep {number}: {statement}")
            _say(f"  output: {outcome.output!r}")
            _say(f"  usage:  {outcome.usage.model_dump()}")
            _say(f"  events: {outcome.events}")
    _say(f"\nclosed: {await session.close()}")
    _say(f"total usage: {total.model_dump()}")


if __name__ == "__main__":
    asyncio.run(main())
