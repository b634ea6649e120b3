"""Service URLs in output and errors: no password, whether it sits in the user part or a query parameter.

The redaction is atlas_common's (one copy for every package); the CLI tests run ``python -m producer``
against a real RabbitMQ and PostgreSQL. The worker's and the ingestor's connection errors are checked with
clients whose errors quote the URL they were given (no driver does today; the services scrub anyway).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import asyncpg.connection
import orjson
import pytest

from atlas_common import SECRET_QUERY_KEYS, redact_url, scrub_secrets, scrub_text, strip_url
from ingestor import IngestorSettings
from ingestor._consumer import Broker
from ingestor._errors import DatabaseUnavailable
from ingestor._liveness import Liveness
from ingestor._store import Store
from tests._ingest_env import wait_for
from tests._logs import captured
from tests._pipeline import ROOT, PipelineStack
from worker.runtime import AdapterRegistry, BrokerUnavailable, LedgerUnavailable, Worker, WorkerSettings

NEEDLE = "s3cret"


@pytest.mark.parametrize("key", sorted(SECRET_QUERY_KEYS))
def test_every_secret_query_key_is_masked(key: str) -> None:
    """Each secret-carrying query key (any case) has its value masked; other parameters are kept."""
    url = f"postgresql://u@db:5432/atlas?sslmode=require&{key.upper()}={NEEDLE}&application_name=x"
    assert redact_url(url) == (
        f"postgresql://u@db:5432/atlas?sslmode=require&{key.upper()}=***&application_name=x"
    )


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://guest:s3cret@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqp://guest:guest@rabbit/?token=s3cret", "amqp://guest:***@rabbit/?token=***"),
        ("amqp://rabbit/vhost", "amqp://rabbit/vhost"),
        ("postgresql://a:s3cret@h1:1,h2:2/d?Api_Key=s3cret", "postgresql://a:***@h1:1,h2:2/d?Api_Key=***"),
        ("postgresql:///d?host=/run/pg&pass%77ord=s3cret", "postgresql:///d?host=/run/pg&pass%77ord=***"),
        ("amqp://guest:s3cret@127.0.0.1:notaport/", "amqp://guest:***@127.0.0.1:notaport/"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    """The user-part password and secret parameters (even percent-encoded keys) become ***; nothing else."""
    assert redact_url(url) == redacted


def test_an_unparseable_url_is_not_echoed() -> None:
    """A URL urlsplit cannot read is replaced by a placeholder rather than printed with its password."""
    assert NEEDLE not in redact_url(f"amqp://guest:{NEEDLE}@[::1/")


def test_scrub_secrets_removes_raw_and_decoded_values() -> None:
    """Both spellings of the user-part password and of a secret parameter vanish from an error text."""
    url = "postgresql://u:p%40ss@h/d?sslpassword=k%2Fey&sslmode=require"
    text = "p%40ss / p@ss / k%2Fey / k/ey / require"
    assert scrub_secrets(text, url) == "*** / *** / *** / *** / require"
    assert scrub_secrets("nothing here", "postgresql://[::1/") == "nothing here"


def test_scrub_text_replaces_longest_first() -> None:
    """A secret that contains another one is replaced whole, so no tail of it survives."""
    assert scrub_text("token abcdef", ["abc", "abcdef"]) == "token ***"


def test_strip_url_drops_everything_that_may_carry_a_credential() -> None:
    """strip_url keeps scheme, host, port and path only (the HTTP adapters' display form)."""
    assert strip_url("https://user:pw@[::1]:8443/v1/x?key=secret#frag") == "https://[::1]:8443/v1/x"
    assert strip_url("https://h:notaport/") == "<invalid url>"


def _producer(stack: PipelineStack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", *args],
        env=stack.env(**env),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
@pytest.mark.parametrize("json_output", [False, True])
def test_status_output_never_shows_a_query_password(pipeline: PipelineStack, json_output: bool) -> None:
    """status (text and --json) with ?password= in both URLs prints them masked."""
    amqp_url = f"{pipeline.amqp_url}?password={NEEDLE}"
    database_url = f"{pipeline.database_url}?password={NEEDLE}"
    args = ["status", "--json"] if json_output else ["status"]

    result = _producer(pipeline, *args, AMQP_URL=amqp_url, DATABASE_URL=database_url)

    assert result.returncode == 0, result.stderr
    assert NEEDLE not in result.stdout + result.stderr
    assert "password=***" in result.stdout
    if json_output:
        data = orjson.loads(result.stdout)
        assert data["database"]["reachable"] is True
        assert data["broker"]["url"].endswith("?password=***")


@pytest.mark.integration
def test_connection_errors_never_show_a_query_password(pipeline: PipelineStack) -> None:
    """Unreachable broker (demo, status) and database (status): the errors name the URL, masked."""
    amqp_url = f"amqp://guest:guest@127.0.0.1:1/?password={NEEDLE}"
    for args in (["demo", "--count", "1", "--no-progress"], ["status"]):
        result = _producer(pipeline, *args, AMQP_URL=amqp_url)
        assert result.returncode == 2, result.stderr
        assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/?password=***" in result.stderr
        assert NEEDLE not in result.stdout + result.stderr
    database_url = f"postgresql://postgres@127.0.0.1:1/atlas?password={NEEDLE}"
    result = _producer(pipeline, "status", "--json", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    database = orjson.loads(result.stdout)["database"]
    assert database["reachable"] is False
    assert "cannot reach PostgreSQL" in database["error"]
    assert database["url"] == "postgresql://postgres@127.0.0.1:1/atlas?password=***"
    assert NEEDLE not in result.stdout + result.stderr


_CONNECT = aio_pika.connect


class _EchoingBroker:
    """``aio_pika.connect`` as a client whose errors quote the URL it was given (password and all): the
    first ``real`` calls connect for real, every later one fails that way."""

    def __init__(self, real: int = 0) -> None:
        self._connect = _CONNECT
        self._real = real
        self.connections: list[Any] = []

    async def __call__(self, url: str, **options: Any) -> Any:
        if len(self.connections) < self._real:
            self.connections.append(await self._connect(url, **options))
            return self.connections[-1]
        raise ConnectionError(f"cannot open a connection to {url}")


async def _refusing_database(dsn: str, *args: Any, **options: Any) -> Any:
    """``asyncpg.connect`` / ``create_pool`` as a driver whose errors quote the URL it was given."""
    raise OSError(f"could not connect to {dsn}")


def _masked(text: str) -> bool:
    return NEEDLE not in text and "password=***" in text


@pytest.mark.integration
async def test_worker_broker_errors_never_show_a_query_password(
    pipeline: PipelineStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker client whose errors quote its URL: the worker's fatal first-connection error (the line the
    CLI prints) and its log when a reconnect is refused show the URL's ?password= masked, never its value."""
    settings = WorkerSettings(
        amqp_url=f"{pipeline.amqp_url}?password={NEEDLE}",
        database_url=pipeline.database_url,
        prefix=pipeline.prefix,
    )
    registry = AdapterRegistry.from_specs([])
    monkeypatch.setattr(aio_pika, "connect", _EchoingBroker())
    with pytest.raises(BrokerUnavailable) as refused:
        await Worker(settings, registry).run(asyncio.Event())
    assert _masked(str(refused.value)), refused.value

    broker = _EchoingBroker(real=1)
    monkeypatch.setattr(aio_pika, "connect", broker)
    stop = asyncio.Event()
    with captured("worker.runtime._runtime") as entries:
        running = asyncio.create_task(Worker(settings, registry).run(stop))

        async def connected() -> bool:
            if running.done():
                running.result()
            return bool(broker.connections)

        async def refused_again() -> bool:  # a warning: logged whatever level an earlier test configured
            return any(e["event"] == "broker.unreachable_retrying" for e in entries)

        await wait_for(connected, within=30, what="the worker connected")
        await broker.connections[0].close()  # its node goes away: the worker reconnects, and is refused
        await wait_for(refused_again, within=30, what="a refused reconnect")
        stop.set()
        await asyncio.wait_for(running, timeout=30)
    retries = [e for e in entries if e["event"] == "broker.unreachable_retrying"]
    assert _masked(str(retries[0]["error"])), retries[0]
    assert all(NEEDLE not in str(e) for e in entries)


async def test_worker_database_errors_never_show_a_query_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """A database driver whose errors quote its URL: the worker's ledger error (the line the CLI prints)
    shows the URL's ?password= masked."""
    monkeypatch.setattr(asyncpg, "create_pool", _refusing_database)
    settings = WorkerSettings(database_url=f"postgresql://atlas@127.0.0.1:5432/atlas?password={NEEDLE}")
    with pytest.raises(LedgerUnavailable) as refused:
        await Worker(settings, AdapterRegistry.from_specs([])).run(asyncio.Event())
    assert _masked(str(refused.value)), refused.value


async def test_ingestor_connection_errors_never_show_a_query_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Clients whose errors quote their URLs: the ingestor's broker error, and its database errors (the
    pool's and the liveness connection's), which it logs while it holds and retries, show ?password=
    masked."""
    monkeypatch.setattr(aio_pika, "connect", _EchoingBroker())
    monkeypatch.setattr(asyncpg, "connect", _refusing_database)
    monkeypatch.setattr(asyncpg.connection, "connect", _refusing_database)
    settings = IngestorSettings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:5672/?password={NEEDLE}",
        database_url=f"postgresql://atlas@127.0.0.1:5432/atlas?password={NEEDLE}",
        jsonl_dir=tmp_path,
    )
    errors: list[str] = []
    with pytest.raises(BrokerUnavailable) as broker_error:
        await Broker(settings).open()
    errors.append(str(broker_error.value))
    async with Store(settings) as store:
        with pytest.raises(DatabaseUnavailable) as pool_error:
            await store.check_schema()
    errors.append(str(pool_error.value))
    async with Liveness(settings) as liveness:
        with pytest.raises(DatabaseUnavailable) as liveness_error:
            await liveness.ensure()
    errors.append(str(liveness_error.value))
    assert [_masked(error) for error in errors] == [True, True, True], errors
