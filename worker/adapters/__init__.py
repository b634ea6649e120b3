"""The built-in adapters, each written against the public SDK (``worker.sessions``) like any other adapter.

- :class:`DemoAdapter`: deterministic, offline and cheap (demos, tests, benchmarks); the worker's default.
- :class:`HTTPAdapter`: posts each session's open, steps and close to an agent's HTTP endpoint.
- :class:`OpenAIChatAdapter`: a conversation per session on any OpenAI-compatible chat completions server.

For a worker spec, ``HTTPAdapterFromEnv`` and ``OpenAIChatAdapterFromEnv`` take no arguments and read
``ATLAS_HTTP_ADAPTER_*`` / ``ATLAS_OPENAI_*`` when built::

    python -m worker --adapter web=worker.adapters:HTTPAdapterFromEnv
    python -m worker --adapter llm=worker.adapters:OpenAIChatAdapterFromEnv
"""

from worker.adapters._demo import DemoAdapter, DemoFailureError
from worker.adapters._http import AdapterHTTPError
from worker.adapters._http_adapter import HTTPAdapter, HTTPAdapterFromEnv, http_adapter_from_env
from worker.adapters._openai_adapter import (
    OpenAIChatAdapter,
    OpenAIChatAdapterFromEnv,
    openai_adapter_from_env,
)

__all__ = [
    "AdapterHTTPError",
    "DemoAdapter",
    "DemoFailureError",
    "HTTPAdapter",
    "HTTPAdapterFromEnv",
    "OpenAIChatAdapter",
    "OpenAIChatAdapterFromEnv",
    "http_adapter_from_env",
    "openai_adapter_from_env",
]
