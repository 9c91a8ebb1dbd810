"""The close broadcast: announcing that a session ended, and remembering who did.

When a session moves to CLOSED or EXPIRED, the one process whose
compare-and-set made the change publishes a :class:`ClosedEvent` on
``names.closed(sid)`` (core NATS: every node hears it in about a
millisecond, leaf nodes included, nothing is stored).

Every bus runs one :class:`CloseListener`: a single subscription to
``names.closed_all`` feeding a bounded LRU of the sessions it heard end (so
a send into one is refused without a KV read), waiters
(``Session.wait_closed()``) and feeds (``sb.closed_events()``). A broadcast
missed while disconnected is not replayed: the session record stays the
authority, and :meth:`Session.info` reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sessionbus.bus._feeds import QueueFeed
from sessionbus.bus.errors import BusClosedError, BusError, nats_errors
from sessionbus.schemas import DecodeError, SessionMetadata, SessionState, decode_map, encode

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

__all__ = ["CloseListener", "ClosedEvent"]

logger = logging.getLogger(__name__)

#: Sessions remembered as closed by each bus.
CLOSED_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class ClosedEvent:
    """A session was closed or expired, as broadcast on ``names.closed(sid)``.

    On the wire it is the codec's msgpack map ``{session_id, state, reason, at}``.
    """

    session_id: str
    state: SessionState
    reason: str
    at: float

    @classmethod
    def of(cls, meta: SessionMetadata) -> ClosedEvent:
        """The event announcing a terminal record."""
        return cls(meta.session_id, meta.state, meta.close_reason, meta.closed_at or time.time())

    def to_wire(self) -> bytes:
        """Encode for the broadcast."""
        return encode({"session_id": self.session_id, "state": self.state.value,
                       "reason": self.reason, "at": self.at})

    @classmethod
    def from_wire(cls, raw: bytes) -> ClosedEvent:
        """Decode a broadcast; :class:`~sessionbus.schemas.DecodeError` if it is not one."""
        body = decode_map(raw)
        try:
            session_id, reason, at = body["session_id"], body.get("reason", ""), body["at"]
            state = SessionState(body["state"])
        except (KeyError, ValueError) as e:
            raise DecodeError(f"not a close event: {e}", raw) from e
        if not (isinstance(session_id, str) and isinstance(reason, str)
                and isinstance(at, int | float) and state.is_terminal):
            raise DecodeError("close event fields have the wrong types", raw)
        return cls(session_id, state, reason, float(at))


class CloseListener:
    """One bus's subscription to every close broadcast, and what it heard."""

    def __init__(self, bus: SessionBus, *, size: int = CLOSED_CACHE_SIZE) -> None:
        self._bus = bus
        self._size = size
        self._heard: OrderedDict[str, ClosedEvent] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[ClosedEvent]]] = {}
        self._feeds: set[QueueFeed[ClosedEvent]] = set()
        self._sub: Subscription | None = None

    def __len__(self) -> int:
        return len(self._heard)

    async def start(self) -> None:
        """Subscribe to ``names.closed_all``; returns once the server holds the subscription."""
        nc = self._bus.nc
        with nats_errors("subscribing to close broadcasts"):
            self._sub = await nc.subscribe(self._bus.names.closed_all, cb=self._on_msg)
            await nc.flush(timeout=math.ceil(self._bus.settings.request_timeout))

    async def stop(self) -> None:
        """Unsubscribe, end the feeds and fail the waiters with BusClosedError."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()
        for feed in list(self._feeds):
            await feed.aclose()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(BusClosedError("the bus was closed"))
        self._waiters.clear()

    def get(self, session_id: str) -> ClosedEvent | None:
        """How ``session_id`` ended, if this bus heard it (or read it terminal)."""
        return self._heard.get(session_id)

    def forget(self, session_id: str) -> None:
        """Drop what was heard about ``session_id`` (its id was opened again)."""
        self._heard.pop(session_id, None)

    def note(self, event: ClosedEvent) -> None:
        """Remember a closure and pass it to waiters and feeds (once per session)."""
        if event.session_id in self._heard:
            self._heard.move_to_end(event.session_id)
            return
        self._heard[event.session_id] = event
        if len(self._heard) > self._size:
            self._heard.popitem(last=False)
        for fut in self._waiters.pop(event.session_id, ()):
            if not fut.done():
                fut.set_result(event)
        for feed in self._feeds:
            feed.push(event)

    async def publish(self, event: ClosedEvent) -> None:
        """Note ``event`` here and broadcast it to every bus (a failure is logged only:
        the record already says the session ended)."""
        self.note(event)
        try:
            with nats_errors(f"broadcasting the close of {event.session_id!r}"):
                await self._bus.nc.publish(
                    self._bus.names.closed(event.session_id), event.to_wire()
                )
        except BusError as e:
            logger.error("session %r is %s but its broadcast failed: %s",
                         event.session_id, event.state.value, e)

    async def wait(self, session_id: str) -> ClosedEvent:
        """Wait until ``session_id`` is heard closed (bound it with ``asyncio.timeout``)."""
        known = self._heard.get(session_id)
        if known is not None:
            return known
        fut: asyncio.Future[ClosedEvent] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(session_id, [])
        waiters.append(fut)
        try:
            return await fut
        finally:
            if fut in waiters:
                waiters.remove(fut)
            if not waiters and self._waiters.get(session_id) is waiters:
                del self._waiters[session_id]

    def feed(self, *, maxsize: int = 10_000) -> QueueFeed[ClosedEvent]:
        """A feed of every closure heard from the moment it is opened."""

        async def on_open(feed: QueueFeed[ClosedEvent]) -> None:
            self._feeds.add(feed)

        async def on_close(feed: QueueFeed[ClosedEvent]) -> None:
            self._feeds.discard(feed)

        return QueueFeed(on_open=on_open, on_close=on_close, maxsize=maxsize,
                         name="close events")

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = ClosedEvent.from_wire(msg.data)
        except DecodeError as e:
            logger.warning("ignoring a malformed close broadcast on %s: %s", msg.subject, e)
            return
        self.note(event)
