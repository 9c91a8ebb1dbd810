"""AG2's MCP ``SessionStore`` made multi-node: :class:`SessionStore`.

The API of ``ag2.mcp.sessions.SessionStore`` (ag2 1.2.x): conversations
named by an MCP session id or by a handle the store mints, bound to the
principal that created them, each with a stable stream id over a shared
``Storage``, served as AG2's own ``MemoryStream`` inside
``Conversation(stream, handle)``, bounded by an LRU cap and an idle TTL, with
``on_evict(handle)`` called as one goes. What changes is where it lives:

* the conversation records (key -> stream id, handle, principal) and the
  handle -> key mapping are in a KV bucket of the bus, so any replica can
  continue a conversation another one started, or by its handle; records
  are only written by compare-and-set, so replicas opening one conversation
  at once agree on one stream id, and one turn lock;
* the turn lock is the bus's cluster-wide :class:`~sessionbus.bus.TurnLock`:
  two replicas never run turns of one conversation at the same time;
* history is in :class:`~sessionbus.integrations.ag2.NatsStorage` on the
  same bus unless another ``Storage`` is given.

The LRU order and the idle clock are this process's view (``clock`` as in
AG2). Evicting drops the conversation everywhere, but only when it is safe:
never while a turn holds its lock anywhere (the lock is taken for the
drop), and never when another replica used it since this one last did (the
record's revision moved on): then this replica only forgets it locally. A
record also expires on the server ``ttl`` seconds after its last use, so a
conversation no replica touches goes even if no replica evicts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from ag2.history import Storage
from ag2.mcp.errors import UnknownConversationError
from ag2.mcp.sessions import Conversation, ConversationBounds
from ag2.stream import MemoryStream

from sessionbus.bus._kv import Bucket
from sessionbus.bus._lock import TurnLock
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusError, ConfigError, KeyConflict, LockLost
from sessionbus.integrations._ag2_storage import NatsStorage
from sessionbus.integrations._bus import BusLink, ensure_bucket
from sessionbus.integrations._keys import token
from sessionbus.schemas.codec import decode_map, encode

__all__ = ["SessionStore"]

logger = logging.getLogger(__name__)

#: How long the delete markers of a dropped conversation stay.
_MARKER_TTL = 60.0

#: Reads and compare-and-set writes of one record before giving up: each
#: conflict is another replica's write landing first, so this is never
#: reached short of that many replicas writing the same record at once.
_CAS_ATTEMPTS = 50


class _Entry:
    """This process's view of one conversation."""

    __slots__ = ("handle", "key", "last", "lock", "principal", "resumed", "revision",
                 "stream_id", "turn")

    def __init__(self, key: str, stream_id: UUID, handle: str, principal: str | None,
                 last: float, revision: int, lock: TurnLock) -> None:
        self.key = key
        self.stream_id = stream_id
        self.handle = handle
        self.principal = principal
        self.last = last
        self.revision = revision
        self.lock = lock
        self.turn = asyncio.Lock()
        self.resumed = 0

    @property
    def in_turn(self) -> bool:
        return self.turn.locked() or self.resumed > 0


class SessionStore:
    """A multi-node ``ag2.mcp.sessions.SessionStore`` on the bus.

    ``max_sessions``, ``ttl``, ``storage`` and ``clock`` are AG2's. The bus is
    ``bus`` (started, owned by the caller) or else ``SessionBus(servers,
    **options)`` started on first use (``SESSIONBUS_URL`` or the embedded
    server) and closed by :meth:`close`. ``bucket`` names the KV bucket of
    conversation records (default ``<prefix>_ag2_sessions``). Raises
    ValueError for a bad bound, as AG2 does.
    """

    def __init__(
        self,
        *,
        max_sessions: int = 1024,
        ttl: float | None = None,
        storage: Storage | None = None,
        clock: Callable[[], float] = time.monotonic,
        bus: SessionBus | None = None,
        servers: str | Sequence[str] | None = None,
        bucket: str | None = None,
        **options: Any,
    ) -> None:
        if max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {max_sessions}.")
        if ttl is not None and ttl <= 0:
            raise ConfigError(f"ttl must be > 0 when set, got {ttl}.")
        self._link = BusLink(bus, servers, options)
        self._own_storage = storage is None
        self._storage: Storage = storage if storage is not None else NatsStorage(bus=bus) if (
            bus is not None) else _LinkedStorage(self._link)
        self._max = max_sessions
        self._ttl = ttl
        self._clock = clock
        self._bucket_name = bucket
        self._kv: Bucket | None = None
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = asyncio.Lock()
        #: Called with a handle as its conversation is dropped (AG2's hook).
        self.on_evict: Callable[[str], None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    @property
    def bounds(self) -> ConversationBounds:
        """The configured bound and idle expiry, for a client-facing description."""
        return ConversationBounds(max_conversations=self._max, ttl=self._ttl)

    async def _bucket(self) -> Bucket:
        if self._kv is None:
            bus = await self._link.open()
            self._kv = await ensure_bucket(
                bus, self._bucket_name or bus.names.ag2_sessions_bucket)
        return self._kv

    async def close(self) -> None:
        """Forget this process's view and close an own bus (records and history stay)."""
        self._entries.clear()
        self._kv = None
        if self._own_storage and isinstance(self._storage, NatsStorage):
            await self._storage.close()  # a storage the caller gave stays open
        await self._link.close()

    # -- AG2's serving API -----------------------------------------------------------

    @asynccontextmanager
    async def session(self, session_id: str, *, principal: str | None = None
                      ) -> AsyncIterator[Conversation]:
        """Yield the conversation named by ``session_id``, holding its turn lock cluster-wide."""
        entry = await self._entry(session_id, principal=principal)
        async with self._held(entry) as conversation:
            yield conversation

    @asynccontextmanager
    async def fresh(self, *, principal: str | None = None) -> AsyncIterator[Conversation]:
        """Mint a conversation under a new (version-4 UUID) handle, holding its turn lock."""
        handle = str(uuid.uuid4())
        entry = await self._entry(handle, principal=principal, handle=handle)
        async with self._held(entry) as conversation:
            yield conversation

    @asynccontextmanager
    async def by_handle(self, handle: str, *, principal: str | None = None
                        ) -> AsyncIterator[Conversation]:
        """Yield the conversation ``handle`` names, from any replica, holding its turn lock.

        Raises ``UnknownConversationError`` if no live conversation has that
        handle or another principal created it.
        """
        entry = await self._handle_entry(handle, principal)
        async with self._held(entry) as conversation:
            yield conversation

    @asynccontextmanager
    async def resumed(self, handle: str) -> AsyncIterator[None]:
        """Keep ``handle``'s conversation from eviction while a paused run continues on it.

        This replica never evicts it meanwhile; the use is recorded at the
        start and end, so other replicas do not drop it either.
        """
        async with self._lock:
            entry = next((e for e in self._entries.values() if e.handle == handle), None)
            # A use other replicas see: none of them drops it now.
            if entry is None or not await self._record_use(entry):
                raise UnknownConversationError()
            entry.resumed += 1
        try:
            yield
        finally:
            entry.resumed -= 1
            entry.last = self._clock()
            with contextlib.suppress(BusError):
                await self._record_use(entry)

    async def acquire(self, session_id: str, *, principal: str | None = None) -> MemoryStream:
        """A stream carrying ``session_id``'s conversation; holds no turn lock."""
        entry = await self._entry(session_id, principal=principal)
        return MemoryStream(storage=self._storage, id=entry.stream_id)

    @asynccontextmanager
    async def _held(self, entry: _Entry) -> AsyncIterator[Conversation]:
        try:
            async with entry.turn, entry.lock:
                try:
                    yield Conversation(
                        stream=MemoryStream(storage=self._storage, id=entry.stream_id),
                        handle=entry.handle,
                    )
                finally:
                    entry.last = self._clock()
                    if self._entries.get(entry.key) is entry:
                        self._entries.move_to_end(entry.key)
        finally:
            if len(self._entries) > self._max:
                # Over the bound because every other one was busy: catch up now
                # that this one is free (it may be the one to go).
                async with self._lock:
                    await self._evict_overflow(serving=None)

    # -- records -----------------------------------------------------------------------

    def _rkey(self, key: str) -> str:
        return f"k.{token(key)}"

    def _hkey(self, handle: str) -> str:
        return f"h.{token(handle)}"

    async def _load(self, key: str) -> tuple[dict[str, Any], int] | None:
        entry = await (await self._bucket()).get(self._rkey(key))
        if entry is None:
            return None
        return decode_map(entry.value), entry.revision

    async def _touch(self, entry: _Entry, *, last: int) -> None:
        """Record a use: rewrite the record (restarting its server TTL).

        Compare-and-set: the record must still be at revision ``last`` (0:
        absent, so this creates it), else KeyConflict. So two replicas
        opening one new conversation at once agree on one stream id (the
        other adopts it), and a use never resurrects or overwrites a record
        another replica dropped or replaced since it was read.
        """
        kv = await self._bucket()
        record = {"stream_id": str(entry.stream_id), "handle": entry.handle,
                  "principal": entry.principal, "used_at": time.time()}
        if last:
            entry.revision = await kv.update(self._rkey(entry.key), encode(record), last=last,
                                             ttl=self._ttl)
        else:
            entry.revision = await kv.create(self._rkey(entry.key), encode(record), ttl=self._ttl)
        await kv.put(self._hkey(entry.handle), encode({"key": entry.key}), ttl=self._ttl)

    async def _record_use(self, entry: _Entry) -> bool:
        """Touch ``entry``'s record if it still names this conversation; False if not."""
        for _ in range(_CAS_ATTEMPTS):
            loaded = await self._load(entry.key)
            if loaded is None or loaded[0].get("stream_id") != str(entry.stream_id):
                return False
            try:
                await self._touch(entry, last=loaded[1])
            except KeyConflict:
                continue  # another replica used it meanwhile: read it again
            return True
        raise KeyConflict(self._rkey(entry.key), None)

    async def _entry(self, key: str, *, principal: str | None, handle: str | None = None
                     ) -> _Entry:
        async with self._lock:
            now = self._clock()
            await self._evict_expired(now)
            for _ in range(_CAS_ATTEMPTS):
                entry = self._entries.get(key)
                loaded = await self._load(key)
                if entry is not None and (loaded is None or
                                          loaded[0].get("stream_id") != str(entry.stream_id)):
                    del self._entries[key]  # gone, or replaced, elsewhere: this view is stale
                    entry = None
                if entry is None:
                    entry = await self._adopt_or_create(key, loaded, principal, handle, now)
                else:
                    entry.last = now
                    self._entries.move_to_end(key)
                try:
                    await self._touch(entry, last=loaded[1] if loaded is not None else 0)
                except KeyConflict:
                    continue  # another replica wrote the record since it was read: read again
                await self._evict_overflow(serving=key)
                return entry
            raise KeyConflict(self._rkey(key), None)

    async def _adopt_or_create(self, key: str, loaded: tuple[dict[str, Any], int] | None,
                               principal: str | None, handle: str | None, now: float) -> _Entry:
        bus = await self._link.open()
        if loaded is not None:  # started by another replica
            body, revision = loaded
            stream_id = UUID(str(body["stream_id"]))
            entry = _Entry(key, stream_id, str(body["handle"]), body.get("principal"), now,
                           revision, TurnLock(bus, f"ag2.{stream_id}"))
        else:
            stream_id = uuid.uuid4()
            entry = _Entry(key, stream_id, handle or str(uuid.uuid4()), principal, now, 0,
                           TurnLock(bus, f"ag2.{stream_id}"))
        self._entries[key] = entry
        return entry

    async def _handle_entry(self, handle: str, principal: str | None) -> _Entry:
        async with self._lock:
            now = self._clock()
            await self._evict_expired(now)
            for _ in range(_CAS_ATTEMPTS):
                mapped = await (await self._bucket()).get(self._hkey(handle))
                key = str(decode_map(mapped.value).get("key")) if mapped is not None else None
                loaded = await self._load(key) if key is not None else None
                if key is None or loaded is None or loaded[0].get("handle") != handle:
                    self._forget(key)
                    raise UnknownConversationError()
                # Revalidated on every call: a handle may leak, a credential change.
                if loaded[0].get("principal") != principal:
                    raise UnknownConversationError()
                entry = self._entries.get(key)
                if entry is None or str(entry.stream_id) != loaded[0].get("stream_id"):
                    self._forget(key)
                    entry = await self._adopt_or_create(key, loaded, principal, handle, now)
                entry.last = now
                self._entries.move_to_end(key)
                try:
                    await self._touch(entry, last=loaded[1])
                except KeyConflict:
                    continue  # another replica wrote the record since it was read: read again
                return entry
            raise KeyConflict(self._hkey(handle), None)

    def _forget(self, key: str | None) -> None:
        if key is not None:
            self._entries.pop(key, None)

    # -- eviction ------------------------------------------------------------------------

    async def _evict_expired(self, now: float) -> None:
        if self._ttl is None:
            return
        for entry in [e for e in self._entries.values() if now - e.last > self._ttl]:
            if not entry.in_turn:
                await self._drop(entry)

    async def _evict_overflow(self, *, serving: str | None) -> None:
        while len(self._entries) > self._max:
            victim = next((e for k, e in self._entries.items()
                           if k != serving and not e.in_turn), None)
            if victim is None:
                return
            await self._drop(victim)

    async def _drop(self, entry: _Entry) -> None:
        """Evict ``entry``: everywhere if nobody else used it since, else only from this view."""
        self._forget(entry.key)
        loaded = await self._load(entry.key)
        if loaded is None or loaded[1] != entry.revision:
            return  # gone already, or used by another replica since: not ours to drop
        if not await entry.lock.try_acquire():
            return  # a turn is running elsewhere
        try:
            kv = await self._bucket()
            try:
                await kv.delete(self._rkey(entry.key), last=entry.revision, ttl=_MARKER_TTL)
            except KeyConflict:
                return  # touched meanwhile
            with contextlib.suppress(BusError):
                await kv.delete(self._hkey(entry.handle), ttl=_MARKER_TTL)
            if self.on_evict is not None:
                self.on_evict(entry.handle)
            await self._storage.drop_history(entry.stream_id)
        finally:
            with contextlib.suppress(LockLost):
                await entry.lock.release()

    def __len__(self) -> int:
        return len(self._entries)


class _LinkedStorage(NatsStorage):
    """The store's default history: a NatsStorage on the store's own bus link."""

    def __init__(self, link: BusLink) -> None:
        super().__init__()
        self._link = link

    async def close(self) -> None:
        """The store closes the link; only unbind here."""
        self._bound = None
