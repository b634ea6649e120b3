"""Fixtures for the private PostgreSQL of ``tests/_pgserver.py`` (fault-injection tests).

``pg_server`` is imported by ``tests/conftest.py``, so every test can ask for it: one cluster per test
session (initdb once), started, removed at the end. It is shared, so a test that stops it must leave it
running: start it again in a ``finally`` or in a fixture of the test module (``start()`` does nothing
when the server runs), as the ``pg`` fixture of ``tests/test_pgserver.py`` does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._pgserver import PgServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A private PostgreSQL for this test session (skipped when no server binaries are installed,
    failed instead when $CI is set)."""
    with PgServer() as server:
        yield server
