"""The worker's three packages keep their direction: sessions (the SDK) <- adapters <- runtime.

An adapter author imports ``worker`` / ``worker.sessions`` and must not pull in the queue runtime (broker,
database, metrics) or the built-in adapters; the built-in adapters use the SDK only; and the other services
do not import the worker at all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests._imports import imported_modules

ROOT = Path(__file__).resolve().parent.parent


def _within(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """The modules that are one of ``packages`` or inside one."""
    return sorted(m for m in modules if m in packages or m.startswith(tuple(p + "." for p in packages)))


def _offending(package: str, banned: tuple[str, ...]) -> dict[str, list[str]]:
    """File -> the banned modules it imports, over every ``.py`` file under ``package``."""
    offences: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _within(imported_modules(path), banned)
        if bad:
            offences[str(path.relative_to(ROOT))] = bad
    return offences


def test_sessions_import_neither_the_runtime_nor_the_adapters() -> None:
    """No module of worker/sessions imports worker.runtime or worker.adapters (directly or by name)."""
    assert _offending("worker/sessions", ("worker.runtime", "worker.adapters")) == {}


def test_adapters_do_not_import_the_runtime() -> None:
    """The built-in adapters are written against the SDK, like any adapter."""
    assert _offending("worker/adapters", ("worker.runtime",)) == {}


def test_adapters_use_only_the_public_sdk() -> None:
    """No built-in adapter imports a private module of the SDK (``worker.sessions._*``): what they need
    is in ``worker.sessions.__all__``, as for any adapter."""
    private = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported_modules(path) if m.startswith("worker.sessions._")
        )
        for path in sorted((ROOT / "worker/adapters").rglob("*.py"))
    }
    assert {path: modules for path, modules in private.items() if modules} == {}


@pytest.mark.parametrize("package", ["ingestor", "producer", "atlas_common", "schemas", "migrations"])
def test_other_packages_do_not_import_the_worker(package: str) -> None:
    assert _offending(package, ("worker",)) == {}


@pytest.mark.parametrize("module", ["worker", "worker.sessions"])
def test_importing_the_sdk_loads_no_runtime(module: str) -> None:
    """In a fresh interpreter, importing the SDK loads no worker.runtime or worker.adapters module, nor the
    broker and database clients the runtime uses."""
    script = (
        "import sys, importlib\n"
        f"importlib.import_module({module!r})\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(done.stdout.split())
    assert "worker.sessions" in loaded
    assert _within(loaded, ("worker.runtime", "worker.adapters", "aio_pika", "asyncpg")) == []


def test_atlas_common_loads_the_broker_and_database_clients_on_first_use() -> None:
    """The SDK may use atlas_common's light names (Backoff, URL scrubbing): importing them loads neither
    aio-pika nor asyncpg, while every name in ``atlas_common.__all__`` still resolves (loading them)."""
    script = (
        "import sys\n"
        "from atlas_common import Backoff, scrub_text, strip_url\n"
        "print(' '.join(sorted(sys.modules)))\n"
        "import atlas_common\n"
        "missing = [n for n in atlas_common.__all__ if getattr(atlas_common, n, None) is None]\n"
        "print(' '.join(missing) or '-')\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    light, missing, everything = done.stdout.splitlines()
    assert _within(set(light.split()), ("aio_pika", "asyncpg")) == []
    assert missing == "-"
    assert {"aio_pika", "asyncpg"} <= set(everything.split())
