"""Requests whose replies come back on one inbox subscription: the lean path for writes.

A stream write (an envelope sent, a KV write) is a publish with a reply
subject and a wait for the server's acknowledgement. nats-py's
``request()`` (under ``js.publish()``) costs about 40 us of client time
per call on top of that (a timeout wrapper, a fresh token from a random
generator, a ``PubAck`` dataclass built by introspection), as much as a
sixth of a whole write on loopback. Here one wildcard inbox subscription
per :class:`Replies` carries every reply, taken as bytes before nats-py
builds a message (``bus._rawsub``); futures are keyed by a counter, a
timeout is a plain timer, and the publish is framed with the header block
written once (``bus._rawpub``).

Separating the publish from the wait also lets a caller put more on the
wire before it waits (the session open publishes its idle timer after the
record, in the same flush), without a task per request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import nats.js.errors
from nats.aio.client import Client
from sessionbus.bus._rawpub import header_block, publish_nowait
from sessionbus.bus._rawsub import status_line, subscribe_raw, unsubscribe_raw
from sessionbus.bus._refusals import watch_replies
from sessionbus.bus._retry import LAST_ATTEMPT, Retry, Unanswered
from sessionbus.bus.errors import BusError, BusTimeout, ConnectionFailed, PermissionDenied

__all__ = ["DUPLICATE_IN_PROCESS", "NoResponders", "Pending", "Replies", "Reply", "acked_sequence",
           "publish_stored"]

_NO_RESPONDERS = 503
#: "duplicate message id is in process": a copy with that id is being stored.
DUPLICATE_IN_PROCESS = 10158
#: An idle heartbeat: a status that answers nothing.
_HEARTBEAT = 100


class NoResponders(ConnectionFailed):
    """Nobody subscribes to a request's subject: it reached no one, so it may be sent again.

    A replicated stream electing a new leader, a stream that does not
    exist, or a cut leaf link.
    """


class Reply(NamedTuple):
    """A reply as it came: its body and its header block (None without headers)."""

    data: bytes
    headers: bytes | None


class Pending:
    """A request on the wire: :meth:`Replies.wait` gives its reply."""

    __slots__ = ("future", "token")

    def __init__(self, token: bytes, future: asyncio.Future[Reply]) -> None:
        self.token = token
        self.future = future


class _Batch:
    """The messages answering one request, until the status that ends them."""

    __slots__ = ("future", "replies")

    def __init__(self, future: asyncio.Future[tuple[int, bytes | None]]) -> None:
        self.future = future
        self.replies: list[Reply] = []


class Replies:
    """Requests over one connection whose replies share one inbox subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._cut = 0
        self._sub: Any = None
        self._starting: asyncio.Future[None] | None = None
        self._waiting: dict[bytes, asyncio.Future[Reply] | _Batch] = {}
        self._subjects: dict[bytes, str] = {}
        """The subject each waiting request was published to (see :meth:`refuse`)."""
        self._tokens = itertools.count(1)
        watch_replies(nc, self)

    async def _start(self) -> None:
        # The subscription is made by a task of its own, shielded: a caller
        # cancelled while it is made must not cancel it for every other.
        starting = self._starting
        if starting is None:
            starting = self._starting = asyncio.ensure_future(self._subscribe())
            starting.add_done_callback(_retrieved)
        await asyncio.shield(starting)

    async def _subscribe(self) -> None:
        try:
            prefix = f"{self._nc.new_inbox()}."
            self._sub = await subscribe_raw(self._nc, f"{prefix}*", self._on_reply)
            self._prefix, self._cut = prefix, len(prefix)
        except BaseException:
            self._starting = None  # the next request tries again
            raise

    def _on_reply(self, subject: bytes, reply: bytes, data: bytes,
                  headers: bytes | None) -> None:
        token = subject[self._cut:]
        waiter = self._waiting.get(token)
        if waiter is None:
            return
        if isinstance(waiter, _Batch):
            status = None if data else status_line(headers)
            if status is None:
                waiter.replies.append(Reply(data, headers))
            elif status[0] != _HEARTBEAT:
                del self._waiting[token]
                self._subjects.pop(token, None)
                if not waiter.future.done():
                    waiter.future.set_result((status[0], headers))
            return
        del self._waiting[token]
        self._subjects.pop(token, None)
        if not waiter.done():
            waiter.set_result(Reply(data, headers))

    def refuse(self, subject: str) -> None:
        """The server refused a publish to ``subject`` (lowercased): its requests fail now.

        With :class:`~sessionbus.bus.errors.PermissionDenied`, where they
        would have waited out their timeout (``bus/_refusals.py``).
        """
        for token, sent_to in list(self._subjects.items()):
            if sent_to.lower() != subject:
                continue
            del self._subjects[token]
            waiter = self._waiting.pop(token, None)
            future = waiter.future if isinstance(waiter, _Batch) else waiter
            if future is not None and not future.done():
                future.set_exception(PermissionDenied(sent_to, "a request"))

    async def close(self) -> None:
        """Unsubscribe the inbox (idempotent); requests still waiting time out."""
        sub, self._sub = self._sub, None
        self._starting = None
        if sub is not None:
            await unsubscribe_raw(self._nc, sub)

    @property
    def waiting(self) -> int:
        """Requests sent whose reply is still waited for."""
        return len(self._waiting)

    async def send(self, subject: str, payload: bytes,
                   headers: Mapping[str, str] | None) -> Pending:
        """Publish ``payload`` with a reply subject; await :meth:`wait` for the reply.

        Raises ValueError for a header that cannot be sent (a line break
        in it), and what ``Client.publish`` raises for a closed or
        draining connection, a full reconnect buffer or an oversized
        payload.
        """
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        token = await self._publish(subject, payload, headers, future)
        return Pending(token, future)

    async def batch(self, subject: str, payload: bytes, *, within: float,
                    what: str) -> tuple[list[Reply], int, bytes | None]:
        """A request answered by messages, then a status: the messages, its code, its headers.

        For a Direct Get batch or ``multi_last`` (ended by 204, 404, 408,
        413...). Idle heartbeats are skipped; a 503 status (nobody
        listens) ends it like any other. BusTimeout, naming ``what``, when
        no status comes within ``within`` seconds.
        """
        future: asyncio.Future[tuple[int, bytes | None]] = (
            asyncio.get_running_loop().create_future())
        batch = _Batch(future)
        token = await self._publish(subject, payload, None, batch)
        timer = asyncio.get_running_loop().call_later(within, _expire, future)
        try:
            code, headers = await future
        except TimeoutError as e:
            raise BusTimeout(f"{what} timed out") from e
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
            self._subjects.pop(token, None)
        return batch.replies, code, headers

    async def _publish(self, subject: str, payload: bytes, headers: Mapping[str, str] | None,
                       waiter: asyncio.Future[Reply] | _Batch) -> bytes:
        if self._starting is None or not self._starting.done() or self._sub is None:
            await self._start()
        block = header_block(headers) if headers else None
        number = str(next(self._tokens))
        token = number.encode()
        self._waiting[token] = waiter
        self._subjects[token] = subject
        try:
            flush = publish_nowait(self._nc, subject, payload, reply=self._prefix + number,
                                   headers=block)
            if flush is not None:
                await flush
        except BaseException:
            self._waiting.pop(token, None)
            self._subjects.pop(token, None)
            raise
        return token

    def discard(self, pending: Pending) -> None:
        """Stop waiting for ``pending``'s reply."""
        self._waiting.pop(pending.token, None)
        self._subjects.pop(pending.token, None)
        if pending.future.done():
            _retrieved(pending.future)  # a refusal (refuse()) that nobody will wait for now

    async def wait(self, pending: Pending, *, within: float, what: str) -> Reply:
        """The reply to ``pending``; BusTimeout after ``within`` s, NoResponders if
        nobody listens on the subject (no stream, an election, a cut leaf link)."""
        future = pending.future
        timer = asyncio.get_running_loop().call_later(within, _expire, future)
        try:
            reply = await future
        except TimeoutError as e:
            raise BusTimeout(f"{what} timed out") from e
        finally:
            timer.cancel()
            self._waiting.pop(pending.token, None)
            self._subjects.pop(pending.token, None)
        if not reply.data:
            status = status_line(reply.headers)
            if status is not None and status[0] == _NO_RESPONDERS:
                raise NoResponders(f"{what}: no JetStream answering")
        return reply


def acked_sequence(reply: Reply, what: str) -> int:
    """The stream sequence a write's acknowledgement names.

    A refusal raises the matching ``nats.js.errors.APIError`` (the
    server's code and description); a status without a body (a leaf link
    or a route cut mid-write) ConnectionFailed; anything that is not an
    acknowledgement BusError.
    """
    if not reply.data:
        raise ConnectionFailed(f"{what}: no JetStream answering")
    try:
        ack = json.loads(reply.data)
        error = ack.get("error")
    except (ValueError, AttributeError) as e:
        raise BusError(f"{what}: not an acknowledgement: {reply.data[:80]!r}") from e
    if error is not None:
        nats.js.errors.APIError.from_error(error)  # raises the matching APIError
    seq = ack.get("seq")
    if type(seq) is not int:
        raise BusError(f"{what}: not an acknowledgement: {reply.data[:80]!r}")
    return seq


async def publish_stored(replies: Replies, subject: str, data: bytes,
                         headers: Mapping[str, str] | None, *, within: float, what: str,
                         dedupe_window: float | None = None) -> int:
    """Publish into a stream and wait for its acknowledgement, for at most ``within`` s.

    Returns the stream sequence the message is stored at.

    While no stream takes the subject ("no responders": a replicated
    stream electing a leader, or one just created on another node), the
    message reached no one, so it is sent again, paced, until the time is
    up (then :class:`NoResponders`, a ``ConnectionFailed``). An attempt
    without any answer may have been stored: it raises BusTimeout, unless
    the message carries a ``Nats-Msg-Id`` and ``dedupe_window`` is the
    stream's duplicate window. Then it is sent again, ``UNANSWERED_WRITES``
    attempts in all, each given ``within`` seconds, as long as the next
    attempt's wait ends inside that window counted from this call's first
    attempt: a copy stored before is acknowledged as a duplicate, with its
    sequence, and is not stored again. While a replicated stream's leader
    is still storing a copy with the same id, it refuses another ("in
    process"): that one is sent again, paced, until it is acknowledged or
    the time is up. Other refusals raise the matching
    ``nats.js.errors.APIError``.
    """
    unanswered: Unanswered | None = None
    first_sent = time.monotonic()
    retry = Retry(within)
    wait = within
    while True:
        pending = await replies.send(subject, data, headers)
        try:
            reply = await replies.wait(pending, within=max(LAST_ATTEMPT, wait), what=what)
        except NoResponders as e:
            left = await retry.resend(e)
            if left is None:
                raise
            wait = left
            continue
        except BusTimeout as e:
            if dedupe_window is None or time.monotonic() - first_sent + within >= dedupe_window:
                raise
            unanswered = unanswered or Unanswered(what)
            unanswered.again(e)  # raises at the bound
            retry, wait = Retry(within), within
            continue
        try:
            return acked_sequence(reply, what)
        except nats.js.errors.APIError as e:
            if e.err_code != DUPLICATE_IN_PROCESS:
                raise
            # A replicated stream's leader is still storing a copy with this
            # id (an attempt that went unanswered, or a concurrent send of the
            # same id): sent again, it is answered as that copy's duplicate.
            left = await retry.resend(e)
            if left is None:
                raise
            wait = left


def _retrieved(done: asyncio.Future[Any]) -> None:
    """Mark a finished future's failure as seen (a start's, or a refusal nobody waits for)."""
    if not done.cancelled():
        done.exception()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
