"""Subscriptions that take deliveries as raw bytes: bulk reads and a worker's hot path.

nats-py turns every delivery into a :class:`nats.aio.msg.Msg`: it parses
the header block into a dict, decodes subject and reply, and queues the
message through an ``asyncio.Queue``; that is most of the client's time
per message on a read of thousands (a history of 1,000 envelopes), and a
good part of a worker's per turn (its pulls' deliveries, its completion
records' replies). None of that is needed there: the stream sequence is
in the reply subject (a consumer's delivery) or one header (a Direct Get
reply), a reply token in the subject, and the body is decoded by the
caller anyway.

:func:`subscribe_raw` subscribes through nats-py (so the subscription is
registered, resubscribed on reconnect and unsubscribed as usual) and
routes that subscription's deliveries, before nats-py builds anything,
to a handler of ``(subject, reply, data, headers)`` bytes: the client's
protocol reader (``bus._wire``) calls it as it cuts each message out of
what it read. Every other subscription's deliveries go to nats-py as
before.

:class:`RawInbox` is the request form: a fresh inbox collecting one
reader's answers. Server status messages (an empty body and a
``NATS/1.0 <code>`` header line) end a request: :meth:`RawInbox.wait`
returns when one arrives, or when ``want`` messages have, and skips idle
heartbeats (100).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from sessionbus.bus._wire import Deliver, installed, routes
from sessionbus.bus.errors import BusTimeout

__all__ = ["RawInbox", "header_value", "status_line", "subscribe_raw"]

#: A status message's header block starts so (then the code, 3 digits).
_STATUS_LINE = b"NATS/1.0 "


def header_value(headers: bytes, name: bytes) -> bytes | None:
    """The raw value of header ``name`` (as ``b"\\r\\nName:"``) in a header block, or None.

    Exact-case match of the name, the value stripped of spaces and tabs:
    what the bus's own readers need from the headers the server writes.
    The *last* line of that name counts, as in nats-py's header dict: a
    stored message keeps whatever headers its publisher set (a forged
    ``Nats-Sequence`` or ``Nats-Pin-Id`` among them), and the server adds
    its own after them.
    """
    start = headers.rfind(name)
    if start < 0:
        return None
    start += len(name)
    end = headers.find(b"\r\n", start)
    return headers[start:end if end >= 0 else None].strip(b" \t")


def status_line(headers: bytes | None) -> tuple[int, str] | None:
    """Code and description of a status header block (``NATS/1.0 503 ...``), None if not one.

    What follows the code on the first line is the description (empty for
    a bare code); a line without a numeric code is no status.
    """
    if headers is None or not headers.startswith(_STATUS_LINE):
        return None
    first = headers[len(_STATUS_LINE):].split(b"\r\n", 1)[0]
    code, _, description = first.partition(b" ")
    if not code.isdigit():
        return None
    return int(code), description.strip().decode("utf-8", "replace")


async def subscribe_raw(nc: Client, subject: str, deliver: Deliver) -> Any:
    """Subscribe ``subject`` through nats-py and hand its deliveries, as bytes, to ``deliver``.

    nats-py keeps the subscription (resubscribed on reconnect, counted in
    its stats); nothing is built or queued per delivery. Returns the
    nats-py subscription; :func:`unsubscribe_raw` ends it.
    """
    sub = await nc.subscribe(subject)
    routes(nc)[sub._id] = deliver
    return sub


async def unsubscribe_raw(nc: Client, sub: Any) -> None:
    """End a subscription made by :func:`subscribe_raw` (idempotent)."""
    try:
        with contextlib.suppress(NatsError):
            await sub.unsubscribe()
    finally:
        _unroute(nc, sub._id)


def _unroute(nc: Client, sid: int) -> None:
    if installed(nc):
        routes(nc).pop(sid, None)


class RawInbox:
    """A subscription on a fresh inbox handing each delivery's raw bytes to a handler.

    Use as ``async with await RawInbox.open(nc) as inbox``: set
    :attr:`on_msg`, send requests with ``reply=inbox.subject``, then
    :meth:`wait` for each answer. ``on_msg(reply, data, headers)`` runs in
    the client's read loop for every data message, in arrival order; it
    returns True when the reader has all it waits for (that ends the
    :meth:`wait`). Should it raise, the error ends the wait and is raised
    there.
    """

    __slots__ = ("_done", "_error", "_flow", "_nc", "_received", "_satisfied", "_sid",
                 "_status", "_sub", "on_msg", "subject")

    def __init__(self, nc: Client, sub: Any) -> None:
        self._nc = nc
        self._sub = sub
        self.subject: str = sub.subject
        self._sid: int = sub._id
        self.on_msg: Callable[[bytes, bytes, bytes | None], bool] = _ignore
        self._received = 0
        self._satisfied = False
        self._status: tuple[int, bytes] | None = None
        self._error: BaseException | None = None
        self._done: asyncio.Future[None] | None = None
        self._flow: list[str] = []

    @classmethod
    async def open(cls, nc: Client) -> RawInbox:
        """Subscribe to a fresh inbox of ``nc`` and route its deliveries here."""
        sub = await nc.subscribe(nc.new_inbox())
        inbox = cls(nc, sub)
        routes(nc)[inbox._sid] = inbox._deliver
        return inbox

    async def __aenter__(self) -> RawInbox:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Unsubscribe and stop routing (idempotent)."""
        self.on_msg = _ignore
        await unsubscribe_raw(self._nc, self._sub)

    def _wake(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _deliver(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if not data and headers is not None and headers.startswith(_STATUS_LINE):
            code = headers[9:12]
            if code == b"100":
                # An idle heartbeat, or a push consumer's flow control request
                # (the reply, or a stalled header, names where to answer).
                to = reply or header_value(headers, b"\r\nNats-Consumer-Stalled:")
                if to:
                    self._flow.append(to.decode())
                    self._wake()
                return
            if code.isdigit():
                self._status = (int(code), headers)
                self._wake()
            return
        self._received += 1
        try:
            if self.on_msg(reply, data, headers):
                self._satisfied = True
                self._wake()
        except Exception as e:  # the reader's error, not the connection's
            self._error = e
            self.on_msg = _ignore
            self._wake()

    async def wait(self, what: str, *, idle: float) -> tuple[int, bytes] | None:
        """Wait for a status, or until :attr:`on_msg` says it has all; returns the status or None.

        Answers flow control requests meanwhile. BusTimeout, naming
        ``what``, when ``idle`` seconds pass without a delivery. The status
        (and the handler's "all") is consumed: the next :meth:`wait` waits
        for a new one.
        """
        loop = asyncio.get_running_loop()
        while self._status is None and not self._satisfied and self._error is None:
            if self._flow:
                flow, self._flow = self._flow, []
                for subject in flow:
                    await self._nc.publish(subject, b"")
                continue
            seen = self._received
            self._done = loop.create_future()
            try:
                async with asyncio.timeout(idle):
                    await self._done
            except TimeoutError as e:
                if self._received == seen:
                    raise BusTimeout(f"no reply from {what} within {idle}s") from e
            finally:
                self._done = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        status, self._status = self._status, None
        self._satisfied = False
        return status


def _ignore(reply: bytes, data: bytes, headers: bytes | None) -> bool:
    return False
