"""Feeds: subscriptions read with ``async for`` and scoped with ``async with``.

A live iterator over a subscription has one trap: if it only subscribes
when first iterated, whatever is published between creating it and the
first ``await anext(...)`` is lost. A :class:`Feed` therefore opens its
subscription in ``async with`` (or :meth:`Feed.open`), and everything
published after that point is seen::

    async with session.interrupts() as interrupts:
        await other.interrupt("stop")
        event = await anext(interrupts)

Iterating a feed that was never opened opens it first, for callers that do
not care about that gap.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

__all__ = ["Feed", "QueueFeed"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _FeedState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Feed(ABC, Generic[T]):
    """An async iterator over a subscription that exists once the feed is open.

    Subclasses implement :meth:`_open`, :meth:`_next` (raising
    ``StopAsyncIteration`` at the end) and :meth:`_close`.
    """

    def __init__(self) -> None:
        self._state = _FeedState.NEW
        self._lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (iteration has ended)."""
        return self._state is _FeedState.CLOSED

    async def open(self) -> Self:
        """Subscribe now; items published from here on are delivered."""
        async with self._lock:
            if self._state is _FeedState.NEW:
                await self._open()
                self._state = _FeedState.OPEN
        return self

    async def aclose(self) -> None:
        """Unsubscribe; a pending or later ``anext()`` ends the iteration."""
        async with self._lock:
            if self._state is _FeedState.OPEN:
                self._state = _FeedState.CLOSED
                await self._close()
            self._state = _FeedState.CLOSED

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._state is _FeedState.NEW:
            await self.open()
        if self._state is _FeedState.CLOSED:
            raise StopAsyncIteration
        return await self._next()

    @abstractmethod
    async def _open(self) -> None:
        """Create the subscription."""

    @abstractmethod
    async def _next(self) -> T:
        """The next item; ``StopAsyncIteration`` when there are no more."""

    @abstractmethod
    async def _close(self) -> None:
        """Remove the subscription."""


class _End:
    """Queued by :meth:`QueueFeed._close` to wake a reader blocked on the queue."""


_END = _End()


class QueueFeed(Feed[T]):
    """A feed whose items are pushed by a subscription callback.

    It holds at most ``maxsize`` items: a reader that falls that far behind
    loses the oldest ones (logged), rather than the process its memory.
    ``on_open`` and ``on_close`` create and remove the subscription that
    calls :meth:`push`.
    """

    def __init__(
        self,
        *,
        on_open: Callable[[QueueFeed[T]], Awaitable[None]],
        on_close: Callable[[QueueFeed[T]], Awaitable[None]],
        maxsize: int = 10_000,
        name: str = "feed",
    ) -> None:
        super().__init__()
        self._on_open = on_open
        self._on_close = on_close
        self._maxsize = maxsize
        self._name = name
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self._dropped = 0

    @property
    def dropped(self) -> int:
        """How many items were discarded because the reader fell behind."""
        return self._dropped

    def push(self, item: T) -> None:
        """Deliver ``item`` to the reader (called from the subscription)."""
        if self.closed:
            return
        if self._queue.qsize() >= self._maxsize:
            self._queue.get_nowait()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                logger.warning("%s reader is behind: %d items dropped", self._name, self._dropped)
        self._queue.put_nowait(item)

    async def _open(self) -> None:
        await self._on_open(self)

    async def _close(self) -> None:
        self._queue.put_nowait(_END)
        await self._on_close(self)

    async def _next(self) -> T:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # later readers end too
            raise StopAsyncIteration
        return item
