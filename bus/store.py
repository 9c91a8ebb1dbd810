"""SessionStore: a bounded LRU + idle-TTL registry of sessions, each bound to its history.

The API of AG2's MCP ``SessionStore``, on the bus. Each session id is bound
to the session's envelope history in the bus's stream, so a replica in
another process or on another machine reads the same turns back, and the
turn lock :meth:`SessionStore.session` holds is the cluster-wide
:class:`~sessionbus.bus._lock.TurnLock`: two replicas never run a turn of one session
at the same time.

Eviction (more than ``max_sessions`` known to this store, or idle longer
than ``ttl`` by ``clock``) drops the session's stored history and record,
as the original does to keep memory bounded. It never evicts a session in
the middle of a turn, here or anywhere: a candidate is evicted only while
this store can take its turn lock without waiting, and the lock is held
while its history is dropped. A busy candidate is skipped for the next
one; if every candidate is busy the store stays over its bound until one
is free.

Every use (a lookup, the end of a turn) rewrites the session's use mark in
a KV bucket shared by all replicas. A replica evicts a session only if its
own write is still the last mark: if another replica used the session
since, the session is neither idle nor least recently used cluster-wide,
and this replica only forgets it locally, keeping its history. A session
idle past ``ttl`` is judged before the use that asks for it refreshes it,
so asking for it by its own id starts it over, as asking for any other
would have.

Sessions the store opens have no idle TTL on the bus: the store's own
bound and ``ttl`` decide when they go, as in the original. The bus's
envelope retention (``envelope_max_age``) still bounds their history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import nats.errors
import nats.js.errors
from sessionbus.bus._kv import Bucket, KVOp, bind_bucket
from sessionbus.bus._lock import TurnLock
from sessionbus.bus._names import encode_token, validate_id
from sessionbus.bus.errors import BusClosedError, BusError, ConfigError, LockLost, SessionExists
from sessionbus.schemas import Envelope, SessionMetadata

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus
    from sessionbus.bus.session import Session

__all__ = ["SessionStore", "SessionStream"]

logger = logging.getLogger(__name__)

#: How long the delete markers of an evicted session's records stay.
_MARKER_TTL = 60.0
#: Use marks of a store without ``ttl`` never expire; with one, at least this long.
_MIN_MARK_TTL = 3600.0


class SessionStream:
    """One session's persistent envelope history, as :class:`SessionStore` hands it out.

    A fresh object on every :meth:`SessionStore.acquire` or
    :meth:`SessionStore.session`; it holds no envelopes itself and reads
    prior turns back from the bus. Inside ``session()`` it carries the turn
    lock's fencing token, and :meth:`send` refuses to write once the lock
    was lost.
    """

    def __init__(self, session: Session, *, lock: TurnLock | None = None) -> None:
        self.session = session
        self._lock = lock
        self._token = lock.token if lock is not None else None

    @property
    def session_id(self) -> str:
        """The session this stream belongs to."""
        return self.session.session_id

    @property
    def token(self) -> int | None:
        """The turn lock's fencing token, or None outside a turn."""
        return self._token

    async def history(self) -> list[Envelope]:
        """Every envelope stored in the session so far, in order."""
        return [envelope async for envelope in self.session.history()]

    async def send(self, content: str = "", **options: Any) -> str:
        """Append an envelope to the session; the arguments and result of ``Session.send``."""
        if self._lock is not None and (self._lock.lost.is_set() or not self._lock.held):
            raise LockLost(
                self.session_id,
                f"turn lock of {self.session_id!r} is no longer held: not sending",
            )
        return await self.session.send(content, **options)

    def __repr__(self) -> str:
        return f"<SessionStream {self.session_id!r} token={self._token}>"


@dataclass(eq=False)
class _Entry:
    session_id: str
    lock: TurnLock
    last_used: float
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Callers inside (or waiting for) a turn, or between lookup and use.
    users: int = 0
    #: Set while the entry is being evicted; done when that finished.
    evicting: asyncio.Future[bool] | None = None
    #: Revision of this store's last write of the session's use mark.
    seen: int = 0


class SessionStore:
    """Bounded LRU registry mapping a session id to its persistent stream.

    ``storage`` is a started :class:`~sessionbus.bus.SessionBus`; without one the store
    makes its own (embedded server, or ``SESSIONBUS_URL``), started by
    :meth:`start`, ``async with`` or first use, and closed by :meth:`close`.
    ``ttl`` is the idle time, measured with ``clock``, after which a
    session is evicted.
    """

    def __init__(
        self,
        *,
        max_sessions: int = 1024,
        ttl: float | None = None,
        storage: SessionBus | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {max_sessions}.")
        if ttl is not None and ttl <= 0:
            raise ConfigError(f"ttl must be > 0 when set, got {ttl}.")
        self._bus = storage
        self._owns_bus = storage is None
        self._max = max_sessions
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._uses_kv: Bucket | None = None
        # A use mark outlives any idle period this store could still judge.
        self._mark_ttl = max(_MIN_MARK_TTL, 2 * ttl) if ttl is not None else None

    # -- lifecycle -------------------------------------------------------------

    @property
    def max_sessions(self) -> int:
        """How many sessions this store keeps before evicting the least recent."""
        return self._max

    @property
    def ttl(self) -> float | None:
        """Idle seconds after which a session is evicted; None: never."""
        return self._ttl

    async def start(self) -> SessionBus:
        """Start the store's own bus if it has none yet; return the bus in use."""
        if self._closed:
            raise BusClosedError("this SessionStore was closed; create a new one")
        async with self._start_lock:
            if self._bus is None:
                from sessionbus.bus.core import SessionBus

                bus = SessionBus()
                await bus.start()
                self._bus = bus
        return self._bus

    async def close(self) -> None:
        """Forget every session (their history stays on the bus) and close an own bus."""
        self._closed = True
        self._entries.clear()
        self._uses_kv = None
        bus, self._bus = self._bus, None
        if bus is not None and self._owns_bus:
            await bus.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    # -- the seed's API --------------------------------------------------------

    @asynccontextmanager
    async def session(self, session_id: str) -> AsyncIterator[SessionStream]:
        """Yield ``session_id``'s stream while holding its turn lock, cluster-wide.

        Holding the lock for the duration of the turn serializes calls on the
        same session, in this process and in every other one, so their
        accumulated history cannot interleave. Raises
        :class:`~sessionbus.bus.errors.LockLost` at the end of the turn if the lock's
        lease was lost during it.
        """
        entry = await self._entry(session_id)
        try:
            async with entry.turn, entry.lock:
                handle = await self._ensure_session(session_id)
                try:
                    yield SessionStream(handle, lock=entry.lock)
                finally:
                    with contextlib.suppress(BusError, nats.errors.Error):
                        await self._mark_used(entry)  # the turn's writes are a use too
        finally:
            entry.users -= 1
            entry.last_used = self._clock()

    async def acquire(self, session_id: str) -> SessionStream:
        """Return a stream carrying ``session_id``'s accumulated history.

        Does not hold the turn lock: prefer :meth:`session` on the serving path.
        """
        entry = await self._entry(session_id)
        try:
            return SessionStream(await self._ensure_session(session_id))
        finally:
            entry.users -= 1

    async def evict(self, session_id: str) -> bool:
        """Evict one session now, dropping its history; False if it is busy or unknown."""
        entry = self._entries.get(session_id)
        if entry is None:
            return False
        return await self._try_evict(entry)

    # -- entries and eviction --------------------------------------------------

    async def _entry(self, session_id: str) -> _Entry:
        """The session's entry, most recent and pinned (``users`` counted) for the caller."""
        validate_id(session_id)
        bus = await self.start()
        while True:
            entry = self._entries.get(session_id)
            if entry is None or entry.evicting is None:
                break
            # Being dropped right now: wait, then start over with a new entry.
            await asyncio.shield(entry.evicting)
        now = self._clock()
        if (entry is not None and self._ttl is not None and now - entry.last_used > self._ttl
                and await self._try_evict(entry)):
            # Idle past ttl itself: judged before this use refreshes it.
            entry = self._entries.get(session_id)
        if entry is None:
            entry = _Entry(session_id=session_id, lock=TurnLock(bus, session_id), last_used=now)
            self._entries[session_id] = entry
        else:
            self._entries.move_to_end(session_id)
            entry.last_used = now
        entry.users += 1
        try:
            await self._mark_used(entry)
            await self._evict_overdue(now)
        except BaseException:
            entry.users -= 1
            raise
        return entry

    async def _uses(self) -> Bucket:
        """The bucket of use marks: one key per session, rewritten on every use."""
        if self._uses_kv is None:
            bus = await self.start()
            self._uses_kv = await bind_bucket(
                bus.nc, bus.js, bus.names.store_uses_bucket, replicas=bus.replicas,
                domain=bus.settings.domain, request_timeout=bus.settings.request_timeout)
        return self._uses_kv

    async def _mark_used(self, entry: _Entry) -> None:
        """Record a use of the session by this store, for every replica to see."""
        kv = await self._uses()
        entry.seen = await kv.put(encode_token(entry.session_id), b"", ttl=self._mark_ttl)

    async def _used_elsewhere(self, entry: _Entry) -> bool:
        """Whether another store used the session since this one last did."""
        head = await (await self._uses()).head(encode_token(entry.session_id))
        return head is not None and head.op is KVOp.PUT and head.revision != entry.seen

    def _idle(self, entry: _Entry) -> bool:
        return entry.users == 0 and not entry.turn.locked() and entry.evicting is None

    async def _evict_overdue(self, now: float) -> None:
        """Evict idle-expired sessions, then the least recent ones over the bound."""
        if self._ttl is not None:
            ttl = self._ttl
            expired = [e for e in self._entries.values() if now - e.last_used > ttl]
            for entry in expired:
                if self._idle(entry):
                    await self._try_evict(entry)
        over = len(self._entries) - self._max
        if over <= 0:
            return
        for entry in list(self._entries.values()):
            if over <= 0:
                break
            if self._idle(entry) and await self._try_evict(entry):
                over -= 1
        if over > 0:
            logger.debug("session store over its bound by %d: the rest are busy", over)

    async def _try_evict(self, entry: _Entry) -> bool:
        """Drop the session's history and record, unless a turn is running anywhere."""
        if not self._idle(entry):
            return False
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry.evicting = done
        evicted = False
        try:
            # Taking the turn lock proves nobody is mid-turn, here or in
            # another process, and keeps it so while the history goes.
            if not await entry.lock.try_acquire():
                logger.debug("not evicting %r: a turn holds its lock", entry.session_id)
                return False
            try:
                if await self._used_elsewhere(entry):
                    # Another replica used it since this one did: it is not
                    # idle, nor this store's least recent; only forget it here.
                    logger.debug("not dropping %r: used by another store since", entry.session_id)
                else:
                    await self._drop(entry.session_id)
            finally:
                with contextlib.suppress(LockLost):
                    await entry.lock.release()
            evicted = True
            if self._entries.get(entry.session_id) is entry:
                del self._entries[entry.session_id]
            return True
        except (BusError, nats.errors.Error) as e:
            logger.warning("evicting session %r failed: %s", entry.session_id, e)
            return False
        finally:
            entry.evicting = None
            done.set_result(evicted)

    async def _drop(self, session_id: str) -> None:
        bus = await self.start()
        names = bus.names
        await bus.js.purge_stream(
            names.envelope_stream, subject=names.history_filter(session_id)
        )
        for key in (names.session_key(session_id), names.session_timer_key(session_id)):
            await bus.sessions_kv.delete(key, ttl=_MARKER_TTL)
        # Once the marker is gone the id is created again without an open hint.
        await bus.lifecycle.states.announce_removed(session_id)
        await (await self._uses()).delete(encode_token(session_id), ttl=_MARKER_TTL)
        logger.info("evicted session %r and its history", session_id)

    # -- the bus session behind a stream ---------------------------------------

    async def _ensure_session(self, session_id: str) -> Session:
        """A loaded handle on the session, opening it afresh if it is absent or ended."""
        from sessionbus.bus.manager import replace_session
        from sessionbus.bus.session import Session

        bus = await self.start()
        lifecycle = bus.lifecycle
        meta = await lifecycle.load(session_id)
        if meta is None:
            # No idle TTL on the bus: the store alone decides when its
            # sessions go (LRU and ``ttl``), as the original does.
            now = time.time()
            fresh = SessionMetadata(
                session_id=session_id, created_at=now, updated_at=now, ttl_seconds=None,
                max_depth=bus.settings.max_depth,
            )
            try:
                await lifecycle.create(fresh)
                meta = fresh
            except SessionExists:  # another replica opened it meanwhile
                meta = await lifecycle.load(session_id)
        if meta is None or meta.is_terminal():
            # Closed by someone else: the id starts over, without the old history.
            meta = await replace_session(bus, session_id, ttl=None, reason="reopened")
        return Session(bus=bus, metadata=meta)
