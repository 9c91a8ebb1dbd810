"""Requests the server refuses for permissions: failed at once, not at their timeout.

A publish that the user's role does not allow gets no answer: the server
drops it and tells the connection (``-ERR 'Permissions Violation for
Publish to "<subject>"'``, which nats-py hands to the error callback,
lowercased). A request to that subject would wait out its timeout, then
say only that it timed out. The bus's error callback calls
:func:`refused`, and the requests of that connection waiting on the
subject fail at once with :class:`~sessionbus.bus.errors.PermissionDenied`:

* the bus's own (:class:`~sessionbus.bus._replies.Replies`: sends, KV
  reads and writes, Direct Gets), each of which registers with
  :func:`watch_replies`;
* requests made through the connection's ``request()`` (JetStream API
  calls, nats-py's JetStream context included), which :func:`install`
  wraps.

Subjects are compared without case (the refusal's text is lowercased):
requests on two subjects that differ only in case both fail.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Protocol

from nats.aio.client import Client
from sessionbus.bus.errors import PermissionDenied

__all__ = ["install", "refused", "watch_replies"]

_BOARD = "_sessionbus_refusals"


class Refusable(Protocol):
    """What waits on replies over a connection and can be told a subject was refused."""

    def refuse(self, subject: str) -> None:
        """Fail every request waiting on ``subject`` (lowercased) with PermissionDenied."""


class _Board:
    """One connection's requests that a refusal ends."""

    __slots__ = ("replies", "requests")

    def __init__(self) -> None:
        self.replies: weakref.WeakSet[Any] = weakref.WeakSet()
        self.requests: dict[str, set[asyncio.Future[str]]] = {}


def _board(nc: Client) -> _Board:
    board: _Board | None = nc.__dict__.get(_BOARD)
    if board is None:
        board = nc.__dict__[_BOARD] = _Board()
    return board


def watch_replies(nc: Client, replies: Refusable) -> None:
    """Tell ``replies`` of every refusal on ``nc`` (held weakly)."""
    _board(nc).replies.add(replies)


def refused(nc: Client, subject: str) -> None:
    """The server refused a publish to ``subject`` on ``nc``: end the requests waiting on it."""
    board = nc.__dict__.get(_BOARD)
    if board is None:
        return
    subject = subject.lower()
    for waiter in board.requests.pop(subject, ()):
        if not waiter.done():
            waiter.set_result(subject)
    for replies in list(board.replies):
        replies.refuse(subject)


def install(nc: Client) -> None:
    """Make ``nc.request()`` fail with PermissionDenied as soon as its subject is refused."""
    if "request" in nc.__dict__:
        return  # installed already
    board = _board(nc)
    original = nc.request

    async def request(subject: str, *args: Any, **kwargs: Any) -> Any:
        key = subject.lower()
        refusal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        board.requests.setdefault(key, set()).add(refusal)
        call = asyncio.ensure_future(original(subject, *args, **kwargs))
        try:
            await asyncio.wait((call, refusal), return_when=asyncio.FIRST_COMPLETED)
            if call.done():
                return call.result()
            raise PermissionDenied(subject, "a request")
        finally:
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
            elif not call.cancelled():
                call.exception()  # retrieved, should the caller have been cancelled meanwhile
            waiting = board.requests.get(key)
            if waiting is not None:
                waiting.discard(refusal)
                if not waiting:
                    del board.requests[key]

    nc.request = request  # type: ignore[method-assign]
