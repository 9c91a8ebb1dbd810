"""The registry's change feeds: close requests and expiries, pushed or polled.

On a JetStream bucket both are KV watches (one ordered consumer each,
headers only): close flags on ``*.*.close`` and TTL markers on ``*.*``. On
a plain :class:`~sessionbus.bus.SessionKVStore`, which has no change feed, they poll
the sessions this node wrote. :func:`until_set` ends any of them when the
registry stops, however long the feed would otherwise wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from sessionbus.bus._kv import KVOp
from sessionbus.bus._names import Names
from sessionbus.bus._registry_backends import HeadState, RegistryBackend
from sessionbus.bus._registry_record import ExpiredSession, decode_record, is_alive
from sessionbus.bus.errors import CorruptRecord, InvalidIdError

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def watch_close_flags(
    storage: RegistryBackend, names: Names
) -> AsyncIterator[tuple[str, str]]:
    """``(call_id, session_id)`` of every close flag set, those already set first."""
    async for event in storage.watch(names.registry_close_filter, include_existing=True):
        if event.op is not KVOp.PUT:
            continue
        try:
            yield names.registry_ids_of_key(event.key)
        except InvalidIdError:
            continue


async def poll_close_flags(
    flagged: Callable[[], Awaitable[list[str]]], interval: float
) -> AsyncIterator[str]:
    """Each id ``flagged()`` newly returns, asking every ``interval`` seconds."""
    seen: set[str] = set()
    while True:
        now = set(await flagged())
        for session_id in sorted(now - seen):
            yield session_id
        seen = now
        await asyncio.sleep(interval)


async def watch_expiries(storage: RegistryBackend, names: Names) -> AsyncIterator[ExpiredSession]:
    """Every record expiry the server marks from now on, removals excluded.

    A removal's delete marker has a TTL too, and when it runs out the
    server places a marker identical to a record's expiry. So the watch
    starts with the last message of every record (headers only) to learn
    which keys hold a removal, and tracks removals from then on; markers
    older than the start are not reported.
    """
    since = await storage.revision()
    removed: set[str] = set()
    async for event in storage.watch(names.registry_record_filter, include_existing=True):
        if event.op is KVOp.PUT:
            removed.discard(event.key)
        elif event.op is not KVOp.EXPIRED:
            removed.add(event.key)
        elif event.key in removed:
            removed.discard(event.key)
        elif event.revision > since:
            try:
                yield ExpiredSession(*names.registry_ids_of_key(event.key))
            except InvalidIdError:
                continue


async def poll_expiries(
    storage: RegistryBackend, sessions: Callable[[], list[tuple[str, str, str]]],
    interval: float,
) -> AsyncIterator[ExpiredSession]:
    """Each of ``sessions()`` (key, call id, session id) found expired, once per expiry."""
    reported: set[str] = set()
    while True:
        for key, call_id, session_id in sessions():
            head = await storage.head(key)
            alive = False
            if head.state is HeadState.LIVE:
                with contextlib.suppress(CorruptRecord):
                    alive = is_alive(decode_record(key, head.value)[1])
            if alive or head.state is HeadState.REMOVED:
                reported.discard(key)
            elif key not in reported:
                reported.add(key)
                yield ExpiredSession(call_id, session_id)
        await asyncio.sleep(interval)


async def until_set(stopped: asyncio.Event, source: AsyncIterator[T]) -> AsyncIterator[T]:
    """The items of ``source`` until ``stopped`` is set; then ``source`` is closed."""
    # Each item is awaited in a task of its own so that setting the event
    # ends a wait that may last forever (a watch with nothing new to say).
    stop = asyncio.ensure_future(stopped.wait())
    item: asyncio.Future[T] | None = None
    try:
        while True:
            item = asyncio.ensure_future(anext(source))
            await asyncio.wait({item, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                return
            try:
                value = item.result()
            except StopAsyncIteration:
                return
            item = None
            yield value
    finally:
        stop.cancel()
        if item is not None and not item.done():
            item.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await item
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def run_callback(
    source: AsyncIterator[T], callback: Callable[[T], Awaitable[None] | None]
) -> None:
    """Call ``callback`` (plain or async) with each item; its errors are logged, not raised."""
    async for item in source:
        try:
            result = callback(item)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("registry callback %r failed on %r", callback, item)
