"""The adapters a worker is configured with. A task names one of them; it can never name anything else."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from worker.adapters import DemoAdapter
from worker.sessions import AdapterConfigError, AgentAdapter, load_adapter

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)=(?P<target>[\w.]+:[\w.]+)$")


@dataclass(frozen=True, slots=True)
class AdapterRegistry:
    """Adapter name -> adapter; ``default`` is the first configured one."""

    adapters: dict[str, AgentAdapter]
    default: str

    @classmethod
    def from_specs(cls, specs: Iterable[str], *, demo_latency_s: float = 0.0) -> AdapterRegistry:
        """Build from ``name=module:attr`` specs; none configured means the built-in demo adapter."""
        adapters: dict[str, AgentAdapter] = {}
        for spec in specs:
            match = _SPEC.match(spec.strip())
            if match is None:
                raise AdapterConfigError(f"adapter spec {spec!r} is not of the form name=module:attr")
            name = match["name"]
            if name in adapters:
                raise AdapterConfigError(f"adapter name {name!r} is configured twice")
            adapters[name] = load_adapter(match["target"], name=name)
        if not adapters:
            adapters["demo"] = DemoAdapter(latency_s=demo_latency_s)
        return cls(adapters=adapters, default=next(iter(adapters)))

    def resolve(self, name: str | None) -> tuple[str, AgentAdapter] | None:
        """The adapter a task asks for (``None``: the default); ``None`` when this worker has no such name."""
        key = self.default if name is None else name
        adapter = self.adapters.get(key)
        return None if adapter is None else (key, adapter)

    def names(self) -> list[str]:
        return list(self.adapters)

    async def aclose(self) -> None:
        """Release what adapters hold (HTTP connection pools); adapters without ``aclose`` hold nothing."""
        for adapter in self.adapters.values():
            closer = getattr(adapter, "aclose", None)
            if closer is not None:
                await closer()
