"""Requests whose replies come back on one inbox subscription: the lean path for writes.

A KV write is a publish with a reply subject and a wait for the server's
acknowledgement. nats-py's ``request()`` (under ``js.publish()``) costs
about 40 us of client time per call on top of that (a timeout wrapper, a
fresh token from a random generator, a ``PubAck`` dataclass built by
introspection), as much as a sixth of a whole write on loopback. Here one
wildcard inbox subscription per :class:`Replies` carries every reply,
futures are keyed by a counter, and a timeout is a plain timer.

Separating the publish from the wait also lets a caller put more on the
wire before it waits (the session open publishes its idle timer after the
record, in the same flush), without a task per request.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

from nats.aio.client import Client
from nats.aio.msg import Msg
from sessionbus.bus.errors import BusTimeout, ConnectionFailed

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription

__all__ = ["NoResponders", "Pending", "Replies"]

_STATUS = "Status"
_NO_RESPONDERS = "503"


class NoResponders(ConnectionFailed):
    """Nobody subscribes to a request's subject: it reached no one, so it may be sent again.

    A replicated stream electing a new leader, a stream that does not
    exist, or a cut leaf link.
    """


class Pending:
    """A request on the wire: :meth:`Replies.wait` gives its reply."""

    __slots__ = ("future", "token")

    def __init__(self, token: str, future: asyncio.Future[Msg]) -> None:
        self.token = token
        self.future = future


class Replies:
    """Requests over one connection whose replies share one inbox subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._starting: asyncio.Future[None] | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count(1)

    async def _start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            try:
                prefix = f"{self._nc.new_inbox()}."
                self._sub = await self._nc.subscribe(f"{prefix}*", cb=self._on_reply)
                self._prefix = prefix
            except BaseException as e:
                starting, self._starting = self._starting, None
                starting.set_exception(e)
                starting.exception()  # retrieved: the next call tries again
                raise
            self._starting.set_result(None)
        # Shielded: a caller cancelled while another starts the inbox must
        # not cancel the start every other caller waits on.
        await asyncio.shield(self._starting)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def send(self, subject: str, payload: bytes, headers: dict[str, str] | None
                   ) -> Pending:
        """Publish ``payload`` with a reply subject; await :meth:`wait` for the reply."""
        if self._starting is None or not self._starting.done() or self._sub is None:
            await self._start()
        token = str(next(self._tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token,
                                   headers=headers)
        except BaseException:
            del self._waiting[token]
            raise
        return Pending(token, future)

    def discard(self, pending: Pending) -> None:
        """Stop waiting for ``pending``'s reply."""
        self._waiting.pop(pending.token, None)

    async def wait(self, pending: Pending, *, within: float, what: str) -> Msg:
        """The reply to ``pending``; BusTimeout after ``within`` s, NoResponders if
        nobody listens on the subject (no stream, an election, a cut leaf link)."""
        future = pending.future
        timer = asyncio.get_running_loop().call_later(within, _expire, future)
        try:
            msg = await future
        except TimeoutError as e:
            raise BusTimeout(f"{what} timed out") from e
        finally:
            timer.cancel()
            self._waiting.pop(pending.token, None)
        if not msg.data and msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            raise NoResponders(f"{what}: no JetStream answering")
        return msg


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
