"""Service URLs in output and errors: no password, whether it sits in the user part or a query parameter.

The redaction is atlas_common's (one copy for every package); the CLI tests run ``python -m producer``
against a real RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from atlas_common import SECRET_QUERY_KEYS, redact_url, scrub_secrets, scrub_text, strip_url
from tests._pipeline import ROOT, PipelineStack

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
