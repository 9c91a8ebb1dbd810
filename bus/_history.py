"""Reading a session's envelopes back: history replay, live feeds, causation lookups.

A session's envelopes are stored under ``<prefix>.p.<partition>.<sid>``;
``names.history_filter(sid)`` matches them whatever the partition.

* :func:`read_history` reads what is stored in a range of stream
  sequences (``bus/_seqread.py``: Direct Get, then a short-lived consumer
  for a long read): the history, a cursor's next page, or the gap in
  front of a worker's cached history;
* :func:`find_depth` finds a causation envelope's depth: from what the
  bus remembers, else by the same read of the whole session, taking ids
  and depths from the headers (``Nats-Msg-Id`` and the depth header).

The other readers are ephemeral *ordered* consumers on that filter
(ARCHITECTURE: ordered consumers are for readers, never one per session
for workers):

* :func:`replay_messages` delivers everything stored, in stream order, and ends when
  caught up (how history was read before :func:`read_history`; its benchmark
  compares the two);
* :class:`LiveFeed` delivers what arrives from the moment it is opened
  (optionally starting with the replay, with no gap between the two).

Envelopes that do not decode are logged and skipped; expired ones (past
their ``ttl_seconds``, not yet dropped by the server) are skipped too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar, cast

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from sessionbus.bus._feeds import QueueFeed
from sessionbus.bus._names import DEPTH_HEADER, MSG_ID_HEADER
from sessionbus.bus._rawsub import header_value
from sessionbus.bus._seqread import newest_start, read_errors, read_range
from sessionbus.bus.errors import nats_errors
from sessionbus.schemas import DecodeError, Envelope, decode

if TYPE_CHECKING:
    from sessionbus.bus._lifecycle import Lifecycle
    from sessionbus.bus.core import SessionBus

__all__ = ["LiveFeed", "find_depth", "read_history", "replay_envelopes", "replay_messages"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MSG_ID = f"\r\n{MSG_ID_HEADER}:".encode()
_DEPTH = f"\r\n{DEPTH_HEADER}:".encode()
#: Digits of a depth header taken as a number (a longer one is read from the body).
_DEPTH_DIGITS = 9

#: Seconds an ephemeral reader outlives its subscriber (then the server drops it).
_INACTIVE = 10.0


async def _subscribe(
    bus: SessionBus, session_id: str, *, deliver_all: bool,
    on_msg: Callable[[Msg], Awaitable[None]] | None = None, after: int = 0,
) -> JetStreamContext.PushSubscription:
    """An ordered consumer of the session: everything, what is new, or from ``after`` + 1."""
    policy = api.DeliverPolicy.ALL if deliver_all else api.DeliverPolicy.NEW
    config = None
    if after > 0:
        policy = api.DeliverPolicy.BY_START_SEQUENCE
        config = api.ConsumerConfig(opt_start_seq=after + 1)
    with nats_errors(f"reading the history of {session_id!r}"):
        return await bus.js.subscribe(
            bus.names.history_filter(session_id), stream=bus.names.envelope_stream,
            cb=on_msg, ordered_consumer=True, deliver_policy=policy, config=config,
            inactive_threshold=_INACTIVE,
        )


async def replay_messages(bus: SessionBus, session_id: str) -> AsyncIterator[Msg]:
    """Every stored message of ``session_id`` in stream order, ending when caught up."""
    sub = await _subscribe(bus, session_id, deliver_all=True)
    try:
        with nats_errors(f"reading the history of {session_id!r}"):
            info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else 0
        if info.num_pending == 0 and not delivered:
            return
        while True:
            with nats_errors(f"reading the history of {session_id!r}"):
                # The server heartbeats an ordered consumer, and nats-py
                # recreates it if they stop: a long wait here is a slow
                # server, not a lost one.
                msg = await sub.next_msg(timeout=bus.settings.request_timeout * 6)
            yield msg
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def decode_envelope(bus: SessionBus, msg: Msg, session_id: str) -> Envelope | None:
    """Decode an envelope stored in ``session_id`` (remembering its depth), or log and return None.

    The depth is remembered only if the envelope names that session: one
    written around the bus that names another must not set its depths.
    """
    try:
        envelope = decode(msg.data, Envelope)
    except DecodeError as e:
        logger.warning("skipping an undecodable envelope on %s: %s", msg.subject, e)
        return None
    if envelope.session_id == session_id:
        bus.lifecycle.remember(envelope)
    return envelope


async def read_history(
    bus: SessionBus, session_id: str, *, after: int = 0, up_to: int | None = None,
    must_reach: int | None = None,
) -> list[tuple[int, Envelope]]:
    """``(stream sequence, envelope)`` of the session with ``after < seq <= up_to``, in order.

    Everything stored, expired envelopes included (readers filter them at
    the time they read); undecodable ones are logged and left out. Each
    envelope is decoded as it arrives (see ``bus/_seqread.py`` for the
    server paths: Direct Get, then a short-lived consumer for a long read).
    ``must_reach``: a sequence known to hold one of the session's
    envelopes, which the read waits for a replica that is behind to reach
    (``read_range``).
    """

    skipped = 0

    def convert(seq: int, data: bytes, headers: bytes | None) -> Envelope | None:
        nonlocal skipped
        try:
            return decode(data, Envelope)
        except DecodeError as e:
            logger.warning("skipping an undecodable envelope of %r at stream sequence %d: %s",
                           session_id, seq, e)
            skipped += 1
            return None

    found = await _read(bus, session_id, convert, after=after, up_to=up_to,
                        must_reach=must_reach)
    # Without a None, the pairs as they are: no second tuple per envelope.
    out = (cast("list[tuple[int, Envelope]]", found) if not skipped
           else [(seq, envelope) for seq, envelope in found if envelope is not None])
    # Under the session read only: an envelope stored here that names another
    # session (written around the bus) must not set that session's depths.
    bus.lifecycle.remember_all(envelope for _, envelope in out
                               if envelope.session_id == session_id)
    return out


async def _read(
    bus: SessionBus, session_id: str, convert: Callable[[int, bytes, bytes | None], T], *,
    after: int = 0, up_to: int | None = None, must_reach: int | None = None,
    headers_only: bool = False,
) -> list[tuple[int, T]]:
    """``read_range`` over the session's envelopes, with the bus's errors."""
    with read_errors(f"reading the history of {session_id!r}"):
        return await read_range(
            bus.nc, convert, stream=bus.names.envelope_stream,
            subject_filter=bus.names.history_filter(session_id), after=after, up_to=up_to,
            must_reach=must_reach, headers_only=headers_only, api_prefix=bus.api_prefix,
        )


async def replay_envelopes(
    bus: SessionBus, session_id: str, *, participant: str | None = None, after: int = 0,
    must_reach: int | None = None, last: int | None = None,
) -> AsyncIterator[Envelope]:
    """The session's envelopes in stream order (those ``participant`` receives, if given).

    Only those stored after stream sequence ``after`` when it is given;
    ``must_reach`` as for :func:`read_history`; with ``last``, only the
    newest ``last`` of them (:func:`read_newest`).
    """
    if last is not None:
        newest, _ = await read_newest(bus, session_id, last, participant=participant,
                                      after=after, must_reach=must_reach)
        for envelope in newest:
            yield envelope
        return
    now = time.time()
    for _, envelope in await read_history(bus, session_id, after=after,
                                          must_reach=must_reach):
        if envelope.is_expired(now):
            continue
        if participant is None or envelope.is_for(participant):
            yield envelope


async def read_newest(
    bus: SessionBus, session_id: str, count: int, *, participant: str | None = None,
    after: int = 0, up_to: int | None = None, must_reach: int | None = None,
) -> tuple[list[Envelope], int]:
    """The newest ``count`` envelopes stored after ``after``, in order, and the last sequence read.

    Unexpired ones, those ``participant`` receives if given, up to stream
    sequence ``up_to`` if given. The read starts where the session's newest
    ``count`` do (``newest_start``: a few one-message Direct Gets), not at
    the session's start; should expired envelopes or others' leave fewer
    than ``count``, it starts twice as far back, and so on, down to
    ``after``.
    """
    newest, cursor = await _read_newest(bus, session_id, count, participant=participant,
                                        after=after, up_to=up_to, must_reach=must_reach)
    return [envelope for _, envelope in newest], cursor


async def _read_newest(
    bus: SessionBus, session_id: str, count: int, *, participant: str | None,
    after: int, up_to: int | None, must_reach: int | None,
) -> tuple[list[tuple[int, Envelope]], int]:
    """:func:`read_newest` with each envelope's stream sequence."""
    want = count
    while True:
        start = max(after, await _newest_start(bus, session_id, want, up_to))
        found = await read_history(bus, session_id, after=start, up_to=up_to,
                                   must_reach=must_reach)
        now = time.time()
        kept = [(seq, envelope) for seq, envelope in found if not envelope.is_expired(now)
                and (participant is None or envelope.is_for(participant))]
        if len(kept) >= count or start <= after:
            return kept[len(kept) - count:] if len(kept) > count else kept, (
                found[-1][0] if found else start)
        want *= 2


async def _newest_start(bus: SessionBus, session_id: str, count: int,
                        up_to: int | None) -> int:
    """:func:`newest_start` on the session's subject, with the bus's errors."""
    with read_errors(f"reading the history of {session_id!r}"):
        return await newest_start(
            bus.replies, stream=bus.names.envelope_stream,
            subject=bus.names.stored(session_id, bus.partitions), count=count,
            up_to=up_to, api_prefix=bus.api_prefix)


class LiveFeed(QueueFeed[Envelope]):
    """New envelopes of one session as ``participant`` receives them (all if None).

    With ``replay=True`` the stored history comes first, then new envelopes,
    from one consumer: nothing is missed or repeated between the two. With
    ``last=N`` the replay starts at the newest N (of those ``participant``
    receives): found as :func:`read_newest` finds them, then one consumer
    from there.
    """

    def __init__(
        self, bus: SessionBus, session_id: str, *, participant: str | None = None,
        replay: bool = False, maxsize: int = 10_000, last: int | None = None,
    ) -> None:
        super().__init__(on_open=self._subscribe, on_close=self._unsubscribe, maxsize=maxsize,
                         name=f"live feed of {session_id!r}")
        self._bus = bus
        self.session_id = session_id
        self.participant = participant
        self._replay = replay or last is not None
        self._last = last
        self._sub: JetStreamContext.PushSubscription | None = None
        self._lifecycle: Lifecycle | None = None

    async def _subscribe(self, _: QueueFeed[Envelope]) -> None:
        after = 0
        if self._last is not None:  # the replay starts at the newest ``last``
            newest, cursor = await _read_newest(
                self._bus, self.session_id, self._last, participant=self.participant,
                after=0, up_to=None,
                must_reach=self._bus.lifecycle.states.stored_through(self.session_id))
            after = newest[0][0] - 1 if newest else cursor
        self._sub = await _subscribe(
            self._bus, self.session_id, deliver_all=self._replay, on_msg=self._on_msg,
            after=after,
        )
        self._lifecycle = self._bus.lifecycle
        self._lifecycle.adopt(self)

    async def _unsubscribe(self, _: QueueFeed[Envelope]) -> None:
        if self._lifecycle is not None:
            self._lifecycle.release(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        envelope = decode_envelope(self._bus, msg, self.session_id)
        if envelope is None or envelope.is_expired():
            return
        if self.participant is None or envelope.is_for(self.participant):
            self.push(envelope)


async def find_depth(bus: SessionBus, session_id: str, envelope_id: str, *,
                     stored: int | None = None) -> int | None:
    """The delegation depth of ``envelope_id`` in ``session_id``, or None if not stored there.

    Answers from the bus's cache of envelopes it sent or read, else reads
    the session's history as :func:`read_history` does, taking each
    envelope's id and depth from its headers (remembering every depth it
    passes); a body is decoded only where the depth header is missing or
    not a number (written by another client). A later lookup reads only
    what was stored after that read, while every depth it noted is still
    remembered: an id the session does not hold (a forged causation)
    costs a read of what is new, not of the whole session. ``stored`` is a
    sequence known to hold one of the session's envelopes (the one a
    worker admits): the read waits for a replica that is behind to reach
    it before it answers None (``read_range``'s ``must_reach``).
    """
    known = bus.lifecycle.known_depth(session_id, envelope_id)
    if known is not None:
        return known
    return await _scan_depths(bus, session_id, envelope_id, stored)


async def _scan_depths(bus: SessionBus, session_id: str, envelope_id: str,
                       stored: int | None = None) -> int | None:
    """:func:`find_depth`'s read of the session, remembering every depth it passes.

    Headers only, past a first page of bodies cut at 64 KiB: a session of
    large envelopes is read for its ids and depths, not its payloads. An
    envelope whose depth header is missing or not a number (written around
    the bus) has its depth in its body only: when such envelopes came
    without their bodies, a second read fetches the bodies from the first
    of them to where the first read ended, once, so that later lookups
    still read only what is new.
    """
    try:
        wanted = envelope_id.encode()
    except UnicodeEncodeError:  # no stored id is such a string
        return None
    # (seq, depth) of the newest copy with a usable depth: what the memory keeps too
    found: list[tuple[int, int]] = []
    first_unread: list[int] = []  # seq of the first id whose depth came without its body
    remember = bus.lifecycle.remember_depth

    def depth_of(seq: int, data: bytes, headers: bytes | None) -> None:
        block = headers or b""
        raw_id = header_value(block, _MSG_ID)
        if not raw_id:
            return
        try:
            msg_id = raw_id.decode()
        except UnicodeDecodeError:  # not an id the bus wrote, nor one it can be asked for
            return
        depth_text = header_value(block, _DEPTH)
        depth: int | None = None
        if depth_text is not None and depth_text.isdigit() and len(depth_text) <= _DEPTH_DIGITS:
            depth = int(depth_text)
        elif not data:  # written around the bus, and only the headers came
            if not first_unread:
                first_unread.append(seq)
            return
        else:  # written around the bus: the body says
            with contextlib.suppress(DecodeError):
                depth = decode(data, Envelope).depth
        if depth is None:
            return
        if raw_id == wanted and (not found or seq > found[0][0]):
            found[:] = [(seq, depth)]
        remember(session_id, msg_id, depth)

    # Only what is stored past the last such read of the session, while the
    # depths that read noted are all still remembered.
    states = bus.lifecycle.states
    scan = states.begin_depth_scan(session_id)
    after = scan.seq
    read = await _read(bus, session_id, depth_of, after=after, headers_only=True,
                       must_reach=stored)
    through = read[-1][0] if read else after
    if first_unread:  # the bodies the headers-only part of the read left behind
        # Not waited for past what it finds (the last envelope may expire or be
        # deleted meanwhile): the note stops where this read stopped.
        bodies = await _read(bus, session_id, depth_of, after=first_unread[0] - 1,
                             up_to=through)
        through = bodies[-1][0] if bodies else first_unread[0] - 1
    states.end_depth_scan(session_id, scan, through)
    return found[0][1] if found else None
