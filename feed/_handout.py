"""What both follows share: items handed out one at a time, each finished (written to the consumer's
cursor) when the loop asks for the next one, or when the ``async with`` block ends without an exception.
One that was being processed when an exception (or a kill) ended the block is handed out again next time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, Self, TypeVar

T = TypeVar("T")


class Handout(Generic[T]):
    """``async with follow as items: async for item in items: ...``. Subclasses give the items
    (:meth:`_items`) and record one as finished (:meth:`_finish`); :meth:`_open` and :meth:`_close`
    run at the block's start and end."""

    _handed: T | None = None
    _handing: AsyncGenerator[T, None] | None = None

    def _items(self) -> AsyncGenerator[T, None]:
        raise NotImplementedError

    async def _finish(self, item: T) -> None:
        raise NotImplementedError

    async def _open(self) -> None:
        """Nothing by default."""

    def _close(self) -> None:
        """Nothing by default."""

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                await self._finish_handed()
            if self._handing is not None:
                await self._handing.aclose()
        finally:
            self._close()

    def __aiter__(self) -> AsyncIterator[T]:
        if self._handing is None:
            self._handing = self._hand_out()
        return self._handing

    async def _hand_out(self) -> AsyncGenerator[T, None]:
        async with contextlib.aclosing(self._items()) as items:
            async for item in items:
                self._handed = item
                yield item
                await self._finish_handed()

    async def _finish_handed(self) -> None:
        handed, self._handed = self._handed, None
        if handed is not None:
            await self._finish(handed)
