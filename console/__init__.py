"""atlas-pipeline's web console: the pipeline at a glance and every session's trajectory.

``python -m console`` (``atlas-console``) serves server-rendered pages on ``CONSOLE_HOST:CONSOLE_PORT``
(loopback, 8070 by default): the overview (queues, rates, sessions by status, ingestion lag, tasks
succeeded but not stored, newest JSONL files; refreshing itself), the sessions list (search and filters,
keyset pages), one session's trajectory (task, plan, steps, timeline, final answer, attempts, its JSONL
line) and the dead letters (requeue after a confirmation, only with ``CONSOLE_REQUEUE_ENABLED=true``).
Read-only against PostgreSQL; embed it with ``aiohttp.web.run_app(create_app(ConsoleSettings()))``.
"""

from console._app import create_app
from console._serve import serve
from console._settings import ConsoleSettings

__all__ = ["ConsoleSettings", "create_app", "serve"]
