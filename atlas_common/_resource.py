"""The one shape of every long-lived resource (connections, pools, ledgers): an async context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Resource:
    """``async with Thing(...) as thing`` calls :meth:`open` then, however the block ends, :meth:`close`.

    Subclasses implement ``close()`` so that it is safe to call twice (and after a failed ``open()``), and
    ``open()`` so that opening an open resource does nothing."""

    async def open(self) -> None:
        """Acquire what the resource holds (nothing by default: some connect lazily)."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
