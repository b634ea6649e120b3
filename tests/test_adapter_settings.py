"""The built-in adapters' environment settings: same defaults as their constructors, problems named by
variable as AdapterConfigError."""

from __future__ import annotations

import inspect
import os

import pytest

from worker.adapters import http_adapter_from_env, openai_adapter_from_env
from worker.adapters._env import AdapterEnvSettings
from worker.adapters._http_adapter import HTTPAdapter, HTTPAdapterSettings
from worker.adapters._openai_adapter import OpenAIChatAdapter, OpenAIChatSettings
from worker.sessions import AdapterConfigError, AgentAdapter


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("ATLAS_HTTP_ADAPTER_", "ATLAS_OPENAI_")):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("settings", "adapter"), [(HTTPAdapterSettings, HTTPAdapter), (OpenAIChatSettings, OpenAIChatAdapter)]
)
def test_settings_defaults_are_the_constructors(
    settings: type[AdapterEnvSettings], adapter: type[AgentAdapter]
) -> None:
    """An unset variable gives what the constructor gives when that argument is left out."""
    parameters = inspect.signature(adapter).parameters
    shared = [name for name in settings.model_fields if name in parameters]
    assert len(shared) >= 4
    for name in shared:
        field = settings.model_fields[name]
        if field.is_required():
            assert parameters[name].default is inspect.Parameter.empty, name
        else:
            assert field.default == parameters[name].default, name


@pytest.mark.parametrize(
    ("suffix", "value", "message"),
    [
        ("TIMEOUT_S", "soon", "ATLAS_HTTP_ADAPTER_TIMEOUT_S must be a number, got 'soon'"),
        ("MAX_RETRIES", "1.5", "ATLAS_HTTP_ADAPTER_MAX_RETRIES must be an integer, got '1.5'"),
        ("SESSION_EVENTS", "maybe", "ATLAS_HTTP_ADAPTER_SESSION_EVENTS must be true/false"),
        ("URL", "   ", "environment variable ATLAS_HTTP_ADAPTER_URL is not set"),
        ("URL", "ftp://host/agent", "must be an absolute http:// or https:// URL"),
        ("MAX_RETRIES", "-1", "max_retries must be a non-negative integer"),
    ],
)
def test_http_problems_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, suffix: str, value: str, message: str
) -> None:
    """Types are checked on reading (naming the variable), ranges and URLs by the constructor."""
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_URL", "http://127.0.0.1/agent")
    monkeypatch.setenv(f"ATLAS_HTTP_ADAPTER_{suffix}", value)
    with pytest.raises(AdapterConfigError) as info:
        http_adapter_from_env()
    assert message in str(info.value)


def test_http_blank_optional_variables_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blank variable leaves the default, as an unset one does; SESSION_EVENTS reads false as false."""
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_URL", " http://127.0.0.1/agent ")
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_TIMEOUT_S", "  ")
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_AUTH_ENV", " ")
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_SESSION_EVENTS", "no")
    adapter = http_adapter_from_env()
    assert (adapter.url, adapter.timeout_s, adapter.header_names) == ("http://127.0.0.1/agent", 30.0, [])
    assert adapter.session_events is False


def test_openai_names_every_problem_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLAS_OPENAI_TEMPERATURE", "warm")
    with pytest.raises(AdapterConfigError) as info:
        openai_adapter_from_env()
    assert str(info.value) == (
        "environment variable ATLAS_OPENAI_BASE_URL is not set; "
        "environment variable ATLAS_OPENAI_MODEL is not set; "
        "environment variable ATLAS_OPENAI_TEMPERATURE must be a number, got 'warm'"
    )


def test_openai_defaults_from_an_almost_empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLAS_OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    monkeypatch.setenv("ATLAS_OPENAI_MODEL", "m")
    monkeypatch.setenv("ATLAS_OPENAI_API_KEY_ENV", "  ")
    adapter = openai_adapter_from_env(name="llm")
    assert (adapter.name, adapter.api_key_env, adapter.timeout_s, adapter.temperature) == (
        "llm",
        "OPENAI_API_KEY",
        60.0,
        None,
    )
    assert adapter.retry_policy.max_retries == 3
