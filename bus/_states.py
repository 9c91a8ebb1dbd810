"""What this process knows about each session, with one rule: the record decides.

Every bus has one :class:`SessionStates` (``sb.states``). It is the only
place a process keeps what it learned about a session: the record as last
read or written (state, revision, limits), the delegation depth of recent
envelopes, and who waits for a close. Session handles, the lifecycle, the
manager, the store and workers ask it; nobody else caches session state.

The session record in KV is the authority. Broadcasts are *hints*:

* a close hint on ``names.closed(sid)`` makes the owner read the record
  again (only for a session it knows or someone waits on); nothing is
  marked closed, and nothing dropped, unless the record says so. A forged
  hint costs one read and changes nothing;
* an open hint on ``names.opened(sid)`` drops what is known, so a reopened
  id is read afresh. It is published when a record replaces an earlier one
  (the marker a delete or an expiry left) or is removed, not when an id is
  used for the first time: nobody can know anything of it then, except a
  process that saw it end so long ago that its terminal record expired
  (``bus.envelope_max_age``: the envelope stream's ``max_age``, the same
  on every bus) and the marker after it too; that knowledge is not
  trusted past ``envelope_max_age`` (a read settles it);
* a disconnect or reconnect makes everything known *stale*: it is read
  again the next time it matters, because hints may have been missed.

A worker asks :meth:`SessionStates.admit` before each turn. That answers
from memory for a session known active (no round trip per envelope), and
reads the record on first sight, after a hint, after a reconnect, and when
a session known ended or missing gets an envelope stored after that was
read (it may have been opened again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sessionbus.bus._closures import ClosedEvent
from sessionbus.bus._feeds import QueueFeed
from sessionbus.bus._kv import MAX_GET_MANY
from sessionbus.bus._names import decode_token
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus.errors import BusClosedError, BusError, nats_errors
from sessionbus.schemas import DecodeError, Envelope, SessionMetadata, decode

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

__all__ = ["Known", "ReadMark", "SessionStates"]

logger = logging.getLogger(__name__)

#: Sessions whose record each process remembers.
KNOWN_SIZE = 100_000
#: Envelope depths each process remembers (for causation lookups).
DEPTH_SIZE = 100_000
#: An envelope stored less than this before a record read showed the session
#: ended or missing may have been sent after a reopen: read the record again.
CLOCK_MARGIN = 0.25
#: Shortest interval between two such re-reads of one session.
REREAD_INTERVAL = 0.2
#: Ids whose forgetting is remembered (so reads sent before it are not kept).
FORGOTTEN_SIZE = 4096
#: Forgettings remembered per id.
FORGETS_PER_ID = 4

CloseListener = Callable[[ClosedEvent], None]
StaleListener = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Known:
    """A session's record as this process last read or wrote it.

    ``meta`` is None when the record did not exist; it never holds tasks.
    ``generation`` tells whether it was read before the last disconnect;
    ``read_at`` is the wall-clock time the read started. ``full`` says
    ``meta`` is the whole record at ``revision`` (it had no tasks to leave
    out), so a compare-and-set may be tried from it without a read.
    ``sent`` orders reads and writes within this process (a monotonic clock).
    """

    session_id: str
    meta: SessionMetadata | None
    revision: int
    generation: int
    read_at: float
    full: bool = False
    sent: float = 0.0

    @property
    def exists(self) -> bool:
        """Whether the record existed."""
        return self.meta is not None

    @property
    def active(self) -> bool:
        """Whether the record existed and was not CLOSED or EXPIRED."""
        return self.meta is not None and not self.meta.is_terminal()


@dataclass(frozen=True, slots=True)
class ReadMark:
    """When a record read was sent, taken with :meth:`SessionStates.mark` before sending it.

    What the read shows is kept only if nothing made the id's knowledge
    void since (an open hint, a removal), and it is fresh only until the
    next disconnect after ``generation``.
    """

    at: float
    generation: int
    epoch: int
    sent: float


@dataclass(slots=True)
class _Forget:
    """One forgetting of an id: when, who waited for its close then, and what was known.

    ``known`` becomes the end a late read showed once that end is told, so
    it is told once.
    """

    epoch: int
    waiters: tuple[asyncio.Future[ClosedEvent], ...]
    known: Known | None


#: A read sent before the oldest forgetting still remembered: whether its id
#: was forgotten since is not known.
_UNKNOWN = _Forget(-1, (), None)


def _end_is_news(before: Known | None, meta: SessionMetadata) -> bool:
    """Whether the end ``meta`` shows is not the end ``before`` already showed (same life)."""
    old = before.meta if before is not None else None
    return old is None or not old.is_terminal() or old.created_at != meta.created_at


def _newer(before: Known, known: Known) -> bool:
    """Whether ``before`` is newer than ``known``: a later revision, or a later read or write.

    Revisions order two records; when either found none (a missing
    record, or one removed and created again), the order of the reads and
    writes in this process does.
    """
    if before.meta is not None and known.meta is not None:
        return before.revision > known.revision
    return before.sent > known.sent


@dataclass(slots=True)
class DepthScan:
    """How far the reads of one session for depths got, all of whose depths are remembered."""

    seq: int = 0


class SessionStates:
    """One process's knowledge of sessions, fed by their records (see the module doc)."""

    def __init__(self, bus: SessionBus, *, size: int = KNOWN_SIZE) -> None:
        self._bus = bus
        self._size = size
        self._known: OrderedDict[str, Known] = OrderedDict()
        self._depths: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._depths_through: dict[str, DepthScan] = {}
        self._stored: dict[str, tuple[int, float]] = {}
        self._reading: dict[str, asyncio.Future[Known]] = {}
        self._outstanding: set[asyncio.Future[Known]] = set()
        self._queued: list[tuple[str, asyncio.Future[Known]]] = []
        self._epoch = 0
        self._forgotten: OrderedDict[str, list[_Forget]] = OrderedDict()
        self._forgotten_floor = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._last_reread: dict[str, float] = {}
        self._generation = 0
        self._waiters: dict[str, list[asyncio.Future[ClosedEvent]]] = {}
        self._feeds: set[QueueFeed[ClosedEvent]] = set()
        self._close_listeners: list[CloseListener] = []
        self._stale_listeners: list[StaleListener] = []
        self._confirming: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self.hints = 0
        """Close and open hints received (for tests and metrics)."""
        self.reads = 0
        """Records read by this owner."""

    def __len__(self) -> int:
        return len(self._known)

    # -- start and stop ---------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the close and open hints; returns once the server holds them."""
        nc, names = self._bus.nc, self._bus.names
        with nats_errors("subscribing to session hints"):
            self._subs = [
                await nc.subscribe(names.closed_all, cb=self._on_closed_hint),
                await nc.subscribe(names.opened_all, cb=self._on_opened_hint),
            ]
            await server_holds_subscriptions(nc, self._bus.settings.request_timeout)

    async def stop(self) -> None:
        """Unsubscribe, end the feeds and fail the waiters with BusClosedError."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()
        for task in [*self._confirming, *self._batches]:
            task.cancel()
        reads, self._outstanding = self._outstanding, set()
        self._reading, self._queued = {}, []
        for read in reads:
            if not read.done():
                read.set_exception(BusClosedError("the bus was closed"))
                read.exception()
        for feed in list(self._feeds):
            await feed.aclose()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(BusClosedError("the bus was closed"))
        self._waiters.clear()

    # -- what is known (no I/O) -------------------------------------------------

    def get(self, session_id: str) -> Known | None:
        """What is known of ``session_id``, stale or not."""
        return self._known.get(session_id)

    def fresh(self, session_id: str) -> Known | None:
        """What is known of ``session_id`` if read since the last disconnect."""
        known = self._known.get(session_id)
        if known is None or known.generation != self._generation:
            return None
        return self._trusted(known)

    def meta(self, session_id: str) -> SessionMetadata | None:
        """The record as last seen (without tasks), None if unknown or missing."""
        known = self._trusted(self._known.get(session_id))
        return None if known is None else known.meta

    def _trusted(self, known: Known | None) -> Known | None:
        """``known``, unless it is an end so old that the id may be in use again unheard.

        A terminal record lives ``envelope_max_age`` and its marker a minute
        more; only then can the id be created again without an open hint
        (see the module doc). Such knowledge is forgotten, to be read afresh.
        """
        if known is None or known.meta is None or not known.meta.state.is_terminal:
            return known
        ended = known.meta.closed_at or known.meta.updated_at
        if time.time() - ended < self._bus.envelope_max_age:
            return known
        if self._known.get(known.session_id) is known:
            del self._known[known.session_id]
        return None

    def stale(self) -> None:
        """Hints may have been missed (disconnect, reconnect): re-read before trusting."""
        self._generation += 1
        for listener in list(self._stale_listeners):
            try:
                listener()
            except Exception:
                logger.exception("a stale-state listener failed")

    # -- feeding it -------------------------------------------------------------

    def mark(self) -> ReadMark:
        """Take just before sending a record read; pass to :meth:`note` with what it showed."""
        return ReadMark(time.time(), self._generation, self._epoch, time.monotonic())

    def note(self, meta: SessionMetadata, revision: int, *, read: ReadMark | None = None) -> Known:
        """Record what a write of the record, or a read sent at ``read``, showed.

        Fires close events. A read sent before the id was forgotten is
        returned but not kept (see :meth:`forget`).
        """
        return self._keep(self._seen(meta, revision, read or self.mark()), read)

    def note_missing(self, session_id: str, *, read: ReadMark | None = None) -> Known:
        """Record that the session's record did not exist (as a read sent at ``read`` found)."""
        return self._keep(self._missing(session_id, read or self.mark()), read)

    @staticmethod
    def _seen(meta: SessionMetadata, revision: int, read: ReadMark) -> Known:
        light = meta.model_copy(update={"tasks": {}}) if meta.tasks else meta
        return Known(meta.session_id, light, revision, read.generation, read.at,
                     full=light is meta, sent=read.sent)

    @staticmethod
    def _missing(session_id: str, read: ReadMark) -> Known:
        return Known(session_id, None, 0, read.generation, read.at, sent=read.sent)

    def _keep(self, known: Known, read: ReadMark | None) -> Known:
        if read is not None:
            forget = self._forgotten_since(known.session_id, read)
            if forget is _UNKNOWN:
                self._confirm_soon(known.session_id)  # read again, and keep that
                return known
            if forget is not None:
                self._ended_before(known, forget)
                return known
        return self._put(known)

    def _forgotten_since(self, session_id: str, read: ReadMark) -> _Forget | None:
        """The id's first forgetting after ``read`` was sent, None if none, or ``_UNKNOWN``.

        Of more than ``FORGETS_PER_ID`` forgettings in one read's time, the
        oldest remembered stands for the first.
        """
        forgets = self._forgotten.get(session_id)
        if forgets is not None:
            return next((forget for forget in forgets if forget.epoch > read.epoch), None)
        if self._forgotten_floor > read.epoch:
            return _UNKNOWN
        return None

    def _ended_before(self, known: Known, forget: _Forget) -> None:
        """A read that was out when its id was forgotten shows an end: tell who waited then.

        Those who waited for the id's close before it was forgotten waited
        for that life; the feeds hear the close unless they heard it already.
        Close listeners are not called: they act on the id, which may be in
        use again by now.
        """
        meta = known.meta
        if meta is None or not meta.is_terminal():
            return
        event = ClosedEvent.of(meta, revision=known.revision)
        waiters, forget.waiters = forget.waiters, ()
        for fut in waiters:
            if not fut.done():
                fut.set_result(event)
        if _end_is_news(forget.known, meta):
            forget.known = known
            for feed in self._feeds:
                feed.push(event)

    def _put(self, known: Known) -> Known:
        sid = known.session_id
        before = self._known.get(sid)
        if before is not None and _newer(before, known):
            # An older read finishing late: keep the newer knowledge, and stamp
            # it fresh if this read was sent after a reconnect.
            if known.generation > before.generation:
                before = Known(sid, before.meta, before.revision, known.generation,
                               before.read_at, full=before.full, sent=before.sent)
                self._known[sid] = before
            return before
        self._known[sid] = known
        self._known.move_to_end(sid)
        if len(self._known) > self._size:
            self._known.popitem(last=False)
        meta = known.meta
        if meta is not None and meta.is_terminal() and _end_is_news(before, meta):
            self._announce(ClosedEvent.of(meta, revision=known.revision))
        return known

    def forget(self, session_id: str) -> None:
        """Drop what is known of ``session_id``: the id was opened again or removed.

        It is read afresh next time. A read already out is answered to
        whoever waits on it but not kept, as no read sent before now is: it
        may carry the record this replaced.
        """
        known = self._known.pop(session_id, None)
        self._reading.pop(session_id, None)
        self._epoch += 1
        forgets = self._forgotten.setdefault(session_id, [])
        forgets.append(_Forget(self._epoch, tuple(self._waiters.get(session_id, ())), known))
        del forgets[:-FORGETS_PER_ID]
        self._forgotten.move_to_end(session_id)
        if len(self._forgotten) > FORGOTTEN_SIZE:
            _, dropped = self._forgotten.popitem(last=False)
            self._forgotten_floor = max(self._forgotten_floor, dropped[-1].epoch)

    # -- reading the authority --------------------------------------------------

    async def read(self, session_id: str) -> Known:
        """Read the record now.

        Concurrent reads of one session share one round trip, and reads of
        different sessions asked for in the same event-loop step share one
        Direct Get (a worker meeting a burst of new sessions reads their
        records together, not one request each).
        """
        pending = self._reading.get(session_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._reading[session_id] = loop.create_future()
            self._outstanding.add(pending)
            self._queued.append((session_id, pending))
            if len(self._queued) == 1:
                loop.call_soon(self._start_reads)
        return await asyncio.shield(pending)

    def _start_reads(self) -> None:
        queued, self._queued = self._queued, []
        for i in range(0, len(queued), MAX_GET_MANY):
            task = asyncio.get_running_loop().create_task(
                self._read_batch(queued[i:i + MAX_GET_MANY]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _read_batch(self, batch: list[tuple[str, asyncio.Future[Known]]]) -> None:
        sids = [sid for sid, _ in batch]
        read = self.mark()
        results: list[Known | BaseException]
        try:
            if len(sids) == 1:
                results = [await self._read(sids[0], read)]
            else:
                results = await self._read_many(sids, read)
        except BaseException as e:
            results = [e] * len(sids)
            if not isinstance(e, Exception):
                self._settle_reads(batch, [BusClosedError("the bus was closed")] * len(sids),
                                   read)
                raise
        self._settle_reads(batch, results, read)

    def _settle_reads(self, batch: list[tuple[str, asyncio.Future[Known]]],
                      results: list[Known | BaseException], read: ReadMark) -> None:
        """Keep what each read showed (unless forgotten meanwhile) and answer its waiters."""
        for (sid, fut), result in zip(batch, results, strict=True):
            if self._reading.get(sid) is fut:
                del self._reading[sid]
            self._outstanding.discard(fut)
            if isinstance(result, Known):
                try:
                    result = self._keep(result, read)
                except Exception as e:  # answer the waiters whatever happens
                    result = e
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
                fut.exception()  # retrieved: waiters re-raise it
            else:
                fut.set_result(result)

    async def _read_many(self, sids: list[str], read: ReadMark) -> list[Known | BaseException]:
        keys = [self._bus.names.session_key(sid) for sid in sids]
        self.reads += len(sids)
        with nats_errors(f"reading {len(sids)} sessions"):
            entries = await self._bus.sessions_kv.get_many(keys)
        out: list[Known | BaseException] = []
        for sid, key in zip(sids, keys, strict=True):
            entry = entries.get(key)
            if entry is None:
                out.append(self._missing(sid, read))
                continue
            try:
                meta = decode(entry.value, SessionMetadata)
            except DecodeError as e:
                out.append(e)
                continue
            out.append(self._seen(meta, entry.revision, read))
        return out

    async def _read(self, session_id: str, read: ReadMark) -> Known:
        key = self._bus.names.session_key(session_id)
        self.reads += 1
        with nats_errors(f"reading session {session_id!r}"):
            entry = await self._bus.sessions_kv.get(key)
        if entry is None:
            return self._missing(session_id, read)
        return self._seen(decode(entry.value, SessionMetadata), entry.revision, read)

    async def current(self, session_id: str) -> Known:
        """What is known if fresh, else one read of the record."""
        known = self.fresh(session_id)
        if known is not None:
            return known
        return await self.read(session_id)

    async def admit(self, session_id: str, stored_at: Callable[[], float]) -> Known:
        """The session's state for running an envelope stored at ``stored_at()`` (wall clock).

        Active and fresh: answered from memory. Unknown or stale: one read.
        Ended or missing: trusted for envelopes stored well before that was
        read; a later envelope may belong to the id opened again, so the
        record is read again (at most every ``REREAD_INTERVAL`` s per session).
        """
        asked = time.monotonic()
        known = self.fresh(session_id)
        if known is None:
            return await self._read_after(session_id, asked)
        if known.active or stored_at() < known.read_at - CLOCK_MARGIN:
            return known
        loop = asyncio.get_running_loop()
        last = self._last_reread.get(session_id)
        if last is not None and loop.time() - last < REREAD_INTERVAL:
            await asyncio.sleep(REREAD_INTERVAL - (loop.time() - last))
            known = self.fresh(session_id)
            if known is not None and (known.active or stored_at() < known.read_at - CLOCK_MARGIN):
                return known
        self._last_reread[session_id] = loop.time()
        if len(self._last_reread) > self._size:
            self._last_reread.clear()
        return await self._read_after(session_id, asked)

    async def _read_after(self, session_id: str, asked: float) -> Known:
        """A read sent after ``asked`` (monotonic), when an earlier one shows no active session.

        :meth:`read` joins a read already out, which may have been sent
        before the envelope being admitted was stored, and so miss the
        session it was sent to (opened again meanwhile).
        """
        known = await self.read(session_id)
        if not known.active and known.sent < asked:
            known = await self.read(session_id)
        return known

    # -- hints ------------------------------------------------------------------

    async def announce_closed(self, meta: SessionMetadata, revision: int) -> None:
        """Note a terminal record this process wrote, then hint every process.

        A failed broadcast is only logged: the record already says it, and
        every process reads it before acting.
        """
        self.note(meta, revision)
        event = ClosedEvent.of(meta, revision=revision)
        try:
            with nats_errors(f"broadcasting the close of {meta.session_id!r}"):
                await self._bus.nc.publish(self._bus.names.closed(meta.session_id),
                                           event.to_wire())
        except BusError as e:
            logger.error("session %r is %s but its broadcast failed: %s",
                         meta.session_id, meta.state.value, e)

    async def announce_opened(self, meta: SessionMetadata, revision: int) -> None:
        """Note a record this process wrote over an earlier one, then hint every process."""
        self.note(meta, revision)
        await self._hint_opened(meta.session_id)

    async def announce_removed(self, session_id: str) -> None:
        """Forget a record this process removed, then hint every process to forget it.

        Once its marker is gone the id can be created again without a hint.
        """
        self.forget(session_id)
        await self._hint_opened(session_id)

    async def _hint_opened(self, session_id: str) -> None:
        try:
            with nats_errors(f"broadcasting the open of {session_id!r}"):
                await self._bus.nc.publish(self._bus.names.opened(session_id),
                                           self._bus.node_id.encode())
        except BusError as e:
            logger.warning("the open hint of %r failed: %s", session_id, e)

    def _session_of(self, msg: Msg) -> str | None:
        parts = msg.subject.split(".")
        if len(parts) != 4:
            return None
        try:
            return decode_token(parts[2])
        except BusError:
            return None

    async def _on_closed_hint(self, msg: Msg) -> None:
        self.hints += 1
        sid = self._session_of(msg)
        if sid is None:
            return
        with contextlib.suppress(DecodeError):
            # A hint that names the revision this process already knows is done.
            event = ClosedEvent.from_wire(msg.data)
            known = self.fresh(sid)
            if (event.session_id == sid and known is not None and known.meta is not None
                    and known.meta.is_terminal() and known.revision >= event.revision):
                return
        self._confirm_soon(sid)

    def _confirm_soon(self, session_id: str) -> None:
        """Read the record in a task of its own, if anything here depends on it."""
        if session_id not in self._known and session_id not in self._waiters and not self._feeds:
            return  # nothing here depends on it; a later use reads the record
        task = asyncio.get_running_loop().create_task(self._confirm(session_id))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _confirm(self, session_id: str) -> None:
        try:
            await self.read(session_id)
        except BusError as e:
            # Not confirmed: drop it so its next use reads the record (reads
            # already out are still kept: nothing made them void).
            logger.warning("could not read the record of %r again: %s", session_id, e)
            self._known.pop(session_id, None)

    async def _on_opened_hint(self, msg: Msg) -> None:
        self.hints += 1
        if msg.data == self._bus.node_id.encode():
            return  # this process's own open, noted already
        sid = self._session_of(msg)
        if sid is not None:
            self.forget(sid)

    # -- who hears closes -------------------------------------------------------

    def _announce(self, event: ClosedEvent) -> None:
        for fut in self._waiters.pop(event.session_id, ()):
            if not fut.done():
                fut.set_result(event)
        for feed in self._feeds:
            feed.push(event)
        for listener in list(self._close_listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("a close listener failed on %r", event.session_id)

    def on_closed(self, listener: CloseListener, *, listen: bool = True) -> None:
        """Call ``listener`` (synchronously) for every close the record confirms."""
        if listen:
            self._close_listeners.append(listener)
        elif listener in self._close_listeners:
            self._close_listeners.remove(listener)

    def on_stale(self, listener: StaleListener, *, listen: bool = True) -> None:
        """Call ``listener`` whenever what is known turns stale (disconnect, reconnect)."""
        if listen:
            self._stale_listeners.append(listener)
        elif listener in self._stale_listeners:
            self._stale_listeners.remove(listener)

    async def wait_closed(self, session_id: str) -> ClosedEvent:
        """Wait until the record of ``session_id`` is seen CLOSED or EXPIRED."""
        known = self._known.get(session_id)
        if known is not None and known.meta is not None and known.meta.is_terminal():
            return ClosedEvent.of(known.meta, revision=known.revision)
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

    def closed_feed(self, *, maxsize: int = 10_000) -> QueueFeed[ClosedEvent]:
        """A feed of every close the record confirms, from the moment it is opened."""

        async def on_open(feed: QueueFeed[ClosedEvent]) -> None:
            self._feeds.add(feed)

        async def on_close(feed: QueueFeed[ClosedEvent]) -> None:
            self._feeds.discard(feed)

        return QueueFeed(on_open=on_open, on_close=on_close, maxsize=maxsize,
                         name="close events")

    # -- delegation depths ------------------------------------------------------

    def remember(self, envelope: Envelope) -> None:
        """Note an envelope's depth, so replies to it need no history scan."""
        self.remember_depth(envelope.session_id, envelope.envelope_id, envelope.depth)

    def remember_all(self, envelopes: Iterable[Envelope]) -> None:
        """:meth:`remember` each of ``envelopes`` in turn (one call for a history read)."""
        depths = self._depths
        to_end = depths.move_to_end
        through = self._depths_through
        for envelope in envelopes:  # remember_depth() inline: a thousand at a time
            envelope_id = envelope.envelope_id
            session_id = envelope.session_id
            if through:
                old = depths.get(envelope_id)
                if old is not None and old[0] != session_id:
                    through.pop(old[0], None)  # an id another session holds too
            depths[envelope_id] = (session_id, envelope.depth)
            to_end(envelope_id)
        self._trim_depths()

    def remember_depth(self, session_id: str, envelope_id: str, depth: int) -> None:
        """Note the depth of ``envelope_id`` in ``session_id``."""
        depths = self._depths
        if self._depths_through:
            old = depths.get(envelope_id)
            if old is not None and old[0] != session_id:
                self._depths_through.pop(old[0], None)
        depths[envelope_id] = (session_id, depth)
        depths.move_to_end(envelope_id)
        if len(depths) > DEPTH_SIZE:
            self._trim_depths()

    def _trim_depths(self) -> None:
        """Forget the oldest depths past DEPTH_SIZE, and the read notes of their sessions."""
        depths = self._depths
        through = self._depths_through
        for _ in range(len(depths) - DEPTH_SIZE):
            _, (session_id, _) = depths.popitem(last=False)
            through.pop(session_id, None)

    def begin_depth_scan(self, session_id: str) -> DepthScan:
        """Where a read of ``session_id`` for depths can start: every depth up to it is here.

        ``DepthScan.seq`` is the stream sequence the completed reads of the
        session got to (see :meth:`end_depth_scan`) as long as none of the
        depths they noted has been forgotten or taken by another session's
        envelope since; else 0.
        """
        through = self._depths_through
        scan = through.get(session_id)
        if scan is None:
            if len(through) >= KNOWN_SIZE:  # the oldest note goes: its session reads whole
                del through[next(iter(through))]
            scan = through[session_id] = DepthScan()
        return scan

    def end_depth_scan(self, session_id: str, scan: DepthScan, seq: int) -> None:
        """The read begun with ``scan`` noted every depth of the session up to ``seq``."""
        if self._depths_through.get(session_id) is scan:  # else one of them went meanwhile
            scan.seq = max(scan.seq, seq)

    def note_stored(self, session_id: str, seq: int) -> None:
        """This process stored an envelope of ``session_id`` at stream sequence ``seq``.

        (One without a TTL of its own: one with a TTL may be gone when read.)
        """
        stored = self._stored
        noted = stored.get(session_id)
        if noted is None or seq > noted[0]:
            if noted is None and len(stored) >= KNOWN_SIZE:
                del stored[next(iter(stored))]  # the oldest noted goes: no wait for it
            stored[session_id] = (seq, time.time())

    def stored_through(self, session_id: str) -> int | None:
        """The newest sequence this process stored an envelope of ``session_id`` at, if noted.

        What its reads of the session wait for a replica that is behind to
        reach, so that they see what it sent (``read_range``'s
        ``must_reach``). None once the envelope stream's ``max_age`` may
        have removed it.
        """
        noted = self._stored.get(session_id)
        if noted is None or time.time() - noted[1] > self._bus.envelope_max_age / 2:
            return None
        return noted[0]

    def known_depth(self, session_id: str, envelope_id: str) -> int | None:
        """The remembered depth of ``envelope_id`` if it belongs to ``session_id``."""
        entry = self._depths.get(envelope_id)
        if entry is None or entry[0] != session_id:
            return None
        return entry[1]

    def __repr__(self) -> str:
        return f"<SessionStates known={len(self._known)} generation={self._generation}>"
