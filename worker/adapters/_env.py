"""Reading a built-in adapter's configuration from the environment, as the services read theirs.

Each ``...FromEnv`` adapter has one pydantic-settings class (an :class:`AdapterEnvSettings` with its own
``env_prefix``). Only the types are checked here; ranges and URLs are checked by the adapter's constructor,
so an adapter built from the environment fails exactly as one built in code would. A problem is an
:class:`AdapterConfigError` naming the environment variable, since that is what the operator must fix.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

from pydantic import ValidationError, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.sessions import AdapterConfigError

_EXPECTED: Final = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "bool_parsing": "true/false (1/0, yes/no)",
}

S = TypeVar("S", bound="AdapterEnvSettings")


class AdapterEnvSettings(BaseSettings):
    """Base of the adapters' settings: a blank variable counts as unset (the adapter's default applies)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        # To an operator a variable set to spaces is "not configured": the adapter's default applies (a
        # required one is reported as not set) instead of a parse error about whitespace.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
        return data


def from_env(settings_class: type[S]) -> S:
    """``settings_class`` read from the environment now; its problems as one :class:`AdapterConfigError`."""
    try:
        return settings_class()
    except ValidationError as err:
        prefix = str(settings_class.model_config.get("env_prefix", ""))
        problems = [_problem(error, prefix) for error in err.errors(include_url=False)]
        raise AdapterConfigError("; ".join(problems)) from None


def _problem(error: ErrorDetails, prefix: str) -> str:
    variable = (prefix + "_".join(str(part) for part in error["loc"])).upper()
    if error["type"] == "missing":
        return f"environment variable {variable} is not set"
    expected = _EXPECTED.get(error["type"])
    if expected is not None:
        return f"environment variable {variable} must be {expected}, got {error['input']!r}"
    return f"environment variable {variable}: {error['msg']}"
