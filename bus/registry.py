"""SessionRegistry: which node hosts which session, shared by every node.

The API of the Vision Agents ``SessionRegistry``, on the bus. A record per
session (its call, hosting node, start time, metrics) lives in the bus's
registry bucket under ``<call>.<session>`` with a per-key TTL; the node
hosting the session keeps it alive with :meth:`SessionRegistry.refresh` or
:meth:`SessionRegistry.update_metrics`. Past the original:

* A heartbeat that finds its record expired re-creates it (or, with
  ``recreate_expired=False``, raises :class:`~bus.errors.SessionExpired`),
  where the original silently let the session vanish. Writes are
  compare-and-set on the record's revision, and :meth:`remove` leaves a
  delete marker for ``tombstone_ttl`` seconds, so a heartbeat racing or
  following a removal never brings the record back.
* :meth:`get_for_call` lists one call's records with a subject filter
  evaluated by the server; ids of any characters are encoded, so a call id
  ``*`` or ``>`` matches only its own sessions.
* Close requests are pushed: :meth:`close_requests` yields, within
  milliseconds, the session ids this node hosts that another node asked to
  close (a KV watch on the close flags). :meth:`get_close_requests` still
  polls.
* :meth:`expired` yields the records whose TTL ran out, from the server's
  TTL markers.
* Sub-second TTLs hold: reads check the ``expires_at`` kept in the record.

Any :class:`~bus.SessionKVStore` works as the store too, with weaker
guarantees: no compare-and-set (a heartbeat racing a removal can re-create
the record), and :meth:`close_requests` / :meth:`expired` poll this node's
sessions every ``poll_interval`` seconds instead of being pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

from bus.core import SessionBus
from bus.errors import (
    BusClosedError,
    ConcurrentUpdate,
    ConfigError,
    CorruptRecord,
    InvalidIdError,
    KeyConflict,
    SessionExpired,
)
from bus.kv import KVOp
from bus.names import Names, validate_id
from bus.registry_backends import BucketBackend, HeadState, RegistryBackend, StoreBackend
from bus.registry_record import Metrics, decode_record, expires_at, validate_metrics
from bus.registry_store import SessionKVStore
from bus.settings import check_ttl
from schemas.codec import encode
from schemas.session import SessionInfo

__all__ = ["ExpiredSession", "SessionRegistry"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Compare-and-set attempts of one heartbeat before ConcurrentUpdate.
_MAX_ATTEMPTS = 8
#: Heartbeats one refresh() keeps in flight.
_REFRESH_CONCURRENCY = 64
#: A removal's delete marker lasts at least this long (seconds).
_MIN_TOMBSTONE_TTL = 60.0


class ExpiredSession(NamedTuple):
    """A registry record whose TTL ran out, as :meth:`SessionRegistry.expired` yields it."""

    call_id: str
    session_id: str


class _Written:
    """The last record this registry wrote for a session, and its revision."""

    __slots__ = ("body", "call_id", "revision", "session_id", "touched")

    def __init__(self, call_id: str, session_id: str, body: dict[str, Any], revision: int
                 ) -> None:
        self.call_id = call_id
        self.session_id = session_id
        self.body = body
        self.revision = revision
        self.touched = time.monotonic()


class SessionRegistry:
    """A multi-node session registry over a shared KV store.

    ``store`` is a started :class:`~bus.SessionBus` (records live in its
    registry bucket), any :class:`~bus.SessionKVStore`, or None: then
    :meth:`start` starts a ``SessionBus()`` of its own (the embedded server,
    or ``SESSIONBUS_URL``) and :meth:`stop` closes it. ``ttl`` is how long a
    record lives without a heartbeat (seconds, > 0, fractions honoured).

    With ``recreate_expired`` (the default) a heartbeat that finds its
    record expired writes it again; without, it raises
    :class:`~bus.errors.SessionExpired`. ``tombstone_ttl`` is how long a
    removal is remembered so heartbeats do not undo it (default: the larger
    of 60 s and twice ``ttl``). ``poll_interval`` only matters for a
    SessionKVStore, which cannot push changes.

    Ids are validated before any I/O (:class:`~bus.errors.InvalidIdError`).
    :meth:`get` raises :class:`~bus.errors.CorruptRecord` (a DecodeError,
    with ``.raw``) for a stored value it cannot decode; listings skip such
    values with a warning in the log.
    """

    def __init__(
        self,
        store: SessionBus | SessionKVStore | None = None,
        *,
        node_id: str | None = None,
        ttl: float = 30.0,
        recreate_expired: bool = True,
        tombstone_ttl: float | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        checked = check_ttl(ttl, "ttl")
        assert checked is not None
        self._ttl = checked
        if tombstone_ttl is None:
            self._tombstone_ttl = max(_MIN_TOMBSTONE_TTL, 2 * checked)
        else:
            tomb = check_ttl(tombstone_ttl, "tombstone_ttl")
            assert tomb is not None
            self._tombstone_ttl = tomb
        poll = check_ttl(poll_interval, "poll_interval")
        assert poll is not None
        self._poll_interval = poll
        if store is not None and not isinstance(store, SessionBus | SessionKVStore):
            raise ConfigError(
                f"store must be a SessionBus or a SessionKVStore, not {type(store).__name__}"
            )
        self._store = store
        self._node_id = validate_id(node_id, "node id") if node_id is not None else (
            uuid.uuid4().hex
        )
        self._recreate = bool(recreate_expired)
        self._names = store.names if isinstance(store, SessionBus) else Names()
        self._backend: RegistryBackend | None = None
        self._own_bus: SessionBus | None = None
        self._written: dict[str, _Written] = {}
        self._last_prune = time.monotonic()
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()

    # -- properties and lifecycle --------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id, written into every record it registers."""
        return self._node_id

    @property
    def ttl(self) -> float:
        """Seconds a record lives without a heartbeat."""
        return self._ttl

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` has not."""
        return self._backend is not None and not self._stopped.is_set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the store (starting a bus of its own when given none)."""
        if self._backend is not None:
            return
        if self._stopped.is_set():
            raise BusClosedError("this registry was stopped; create a new one")
        store = self._store
        if store is None:
            self._own_bus = store = SessionBus()
            self._names = store.names
            await store.start()
        if isinstance(store, SessionBus):
            if not store.started:
                raise BusClosedError("the registry's SessionBus is not started")
            backend: RegistryBackend = BucketBackend(store.registry_kv, store.names)
            if store is not self._own_bus:
                store.add_service(self)  # the bus's close() stops this registry first
        else:
            backend = StoreBackend(store, self._names)
            await backend.start()
        self._backend = backend

    async def stop(self) -> None:
        """End the iterators and callbacks, close the store (or the bus it started)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        backend, self._backend = self._backend, None
        if isinstance(backend, StoreBackend):
            await backend.close()
        if self._own_bus is not None:
            await self._own_bus.close()

    def _storage(self) -> RegistryBackend:
        if self._backend is None or self._stopped.is_set():
            raise BusClosedError("the registry is not started (use 'async with SessionRegistry()')")
        return self._backend

    # -- records --------------------------------------------------------------

    async def register(self, call_id: str, session_id: str) -> None:
        """Write a new record for a session hosted on this node (replacing any)."""
        key = self._names.registry_key(call_id, session_id)
        storage = self._storage()
        now = time.time()
        body: dict[str, Any] = {
            "session_id": session_id, "call_id": call_id, "node_id": self._node_id,
            "started_at": now, "metrics_updated_at": now, "metrics": {},
            "expires_at": now + self._ttl,
        }
        revision = await storage.put(key, encode(body), self._ttl)
        self._written[key] = _Written(call_id, session_id, body, revision)
        self._prune()

    async def remove(self, call_id: str, session_id: str) -> None:
        """Delete a session's record and close flag.

        Both keys keep a delete marker for ``tombstone_ttl`` seconds: a
        heartbeat that arrives meanwhile sees the removal and does nothing.
        """
        key = self._names.registry_key(call_id, session_id)
        close_key = self._names.registry_close_key(call_id, session_id)
        storage = self._storage()
        self._written.pop(key, None)
        await asyncio.gather(
            storage.tombstone(key, self._tombstone_ttl),
            storage.tombstone(close_key, self._tombstone_ttl),
        )

    async def get(self, call_id: str, session_id: str) -> SessionInfo | None:
        """The session's record, or None if absent, removed or past its ``expires_at``.

        Raises :class:`~bus.errors.CorruptRecord` if the stored value is not a record.
        """
        key = self._names.registry_key(call_id, session_id)
        raw = await self._storage().read(key)
        if raw is None:
            return None
        info, body = decode_record(key, raw)
        self._check_names(key, info, call_id, session_id, raw)
        return info if self._alive(body) else None

    async def get_for_call(self, call_id: str) -> list[SessionInfo]:
        """Every live session of one call, on any node, listed by a server-side filter.

        Values that do not decode are skipped with a warning.
        """
        self._names.registry_call_filter(call_id)  # validates before any I/O
        out: list[SessionInfo] = []
        for key, raw in await self._storage().list_call(call_id):
            try:
                info, body = decode_record(key, raw)
                _, session_id = self._names.registry_ids_of_key(key)
                self._check_names(key, info, call_id, session_id, raw)
            except (CorruptRecord, InvalidIdError) as e:
                logger.warning("skipping registry record %r: %s", key, e)
                continue
            if self._alive(body):
                out.append(info)
        out.sort(key=lambda i: (i.started_at, i.session_id))
        return out

    # -- heartbeats -----------------------------------------------------------

    async def update_metrics(
        self, call_id: str, session_id: str, metrics: dict[str, int | float | None]
    ) -> None:
        """Replace a session's metrics and restart its TTL.

        Raises :class:`~bus.errors.InvalidMetrics` unless ``metrics`` is a
        dict of str -> int | float | None. An expired record is re-created
        (or SessionExpired raised, see the class); a removed one is left alone.
        """
        checked = validate_metrics(metrics)
        key = self._names.registry_key(call_id, session_id)
        await self._heartbeat(key, call_id, session_id, checked)

    async def refresh(self, sessions: Mapping[str, str]) -> None:
        """Restart the TTL of every session in ``sessions`` (session id -> call id).

        Every session is handled even if some fail; then the first error is
        raised (SessionExpired last, for ``recreate_expired=False``).
        """
        if not isinstance(sessions, Mapping):
            raise ConfigError(f"sessions must be a dict of session id -> call id, not "
                              f"{type(sessions).__name__}")
        keys = [(self._names.registry_key(call_id, sid), call_id, sid)
                for sid, call_id in sessions.items()]
        self._storage()
        limit = asyncio.Semaphore(_REFRESH_CONCURRENCY)

        async def one(key: str, call_id: str, sid: str) -> None:
            async with limit:
                await self._heartbeat(key, call_id, sid, None)

        results = await asyncio.gather(*(one(*k) for k in keys), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        errors.sort(key=lambda e: isinstance(e, SessionExpired))
        if errors:
            raise errors[0]

    async def _heartbeat(
        self, key: str, call_id: str, session_id: str, metrics: Metrics | None
    ) -> None:
        # One heartbeat per key at a time in this process: concurrent ones
        # would only make each other's compare-and-set fail.
        lock = self._key_locks.get(key)
        if lock is None:
            lock = self._key_locks[key] = asyncio.Lock()
        try:
            async with lock:
                await self._heartbeat_locked(key, call_id, session_id, metrics)
        finally:
            if not lock.locked() and self._key_locks.get(key) is lock:
                del self._key_locks[key]

    async def _heartbeat_locked(
        self, key: str, call_id: str, session_id: str, metrics: Metrics | None
    ) -> None:
        storage = self._storage()
        written = self._written.get(key)
        base = written.body if written is not None else None
        last = written.revision if written is not None else None
        for attempt in range(_MAX_ATTEMPTS):
            now = time.time()
            if last is None:
                head = await storage.head(key)
                if head.state is HeadState.REMOVED:
                    self._written.pop(key, None)
                    logger.debug("not refreshing %r: it was removed", key)
                    return
                last = head.revision
                expired = True
                if head.state is HeadState.LIVE:
                    try:
                        _, base = decode_record(key, head.value)
                        expired = not self._alive(base, now)
                    except CorruptRecord as e:
                        logger.warning("overwriting registry record %r: %s", key, e)
            else:
                assert base is not None
                expired = not self._alive(base, now)
            if expired:
                if not self._recreate:
                    self._written.pop(key, None)
                    raise SessionExpired(session_id, call_id)
                logger.info("registry record of session %r (call %r) had expired: "
                            "writing it again", session_id, call_id)
            body = self._next_body(call_id, session_id, base, now, metrics)
            try:
                revision = await storage.write(key, encode(body), self._ttl, last=last)
            except KeyConflict:
                last = None  # another node wrote or removed it: look again
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                continue
            self._written[key] = _Written(call_id, session_id, body, revision)
            self._prune()
            return
        raise ConcurrentUpdate(session_id, _MAX_ATTEMPTS)

    def _next_body(
        self, call_id: str, session_id: str, base: dict[str, Any] | None, now: float,
        metrics: Metrics | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = dict(base) if base is not None else {
            "node_id": self._node_id, "started_at": now, "metrics_updated_at": now,
            "metrics": {},
        }
        body["session_id"] = session_id
        body["call_id"] = call_id
        if metrics is not None:
            body["metrics"] = metrics
            body["metrics_updated_at"] = now
        body["expires_at"] = now + self._ttl
        return body

    # -- close requests -------------------------------------------------------

    async def request_close(self, call_id: str, session_id: str) -> None:
        """Set a session's close flag, from any node; it lives ``ttl`` seconds."""
        key = self._names.registry_close_key(call_id, session_id)
        value = encode({"requested_at": time.time(), "node_id": self._node_id})
        await self._storage().put(key, value, self._ttl)

    async def get_close_requests(self, sessions: Mapping[str, str]) -> list[str]:
        """The ids among ``sessions`` (session id -> call id) with a close flag set."""
        if not isinstance(sessions, Mapping):
            raise ConfigError(f"sessions must be a dict of session id -> call id, not "
                              f"{type(sessions).__name__}")
        ids = list(sessions)
        keys = [self._names.registry_close_key(sessions[sid], sid) for sid in ids]
        values = await self._storage().read_many(keys)
        return [sid for sid, value in zip(ids, values, strict=True) if value is not None]

    async def close_requests(self) -> AsyncIterator[str]:
        """Yield the id of each session hosted on this node when a close is requested.

        Flags already set when iteration starts come first. A session is
        this node's if this registry wrote its record, or if its record
        names this node. Ends when the registry stops.
        """
        storage = self._storage()
        source = self._watch_close(storage) if storage.watches else self._poll_close()
        async for session_id in self._until_stopped(source):
            yield session_id

    async def _watch_close(self, storage: RegistryBackend) -> AsyncIterator[str]:
        async for event in storage.watch(self._names.registry_close_filter,
                                         include_existing=True):
            if event.op is not KVOp.PUT:
                continue
            try:
                call_id, session_id = self._names.registry_ids_of_key(event.key)
            except InvalidIdError:
                continue
            if await self._is_mine(call_id, session_id):
                yield session_id

    async def _poll_close(self) -> AsyncIterator[str]:
        seen: set[str] = set()
        while True:
            sessions = {w.session_id: w.call_id for w in self._written.values()}
            flagged = set(await self.get_close_requests(sessions))
            for session_id in sorted(flagged - seen):
                yield session_id
            seen = flagged
            await asyncio.sleep(self._poll_interval)

    async def _is_mine(self, call_id: str, session_id: str) -> bool:
        key = self._names.registry_key(call_id, session_id)
        if key in self._written:
            return True
        raw = await self._storage().read(key)
        if raw is None:
            return False
        try:
            info, _ = decode_record(key, raw)
        except CorruptRecord:
            return False
        return info.node_id == self._node_id

    # -- expiry ---------------------------------------------------------------

    async def expired(self) -> AsyncIterator[ExpiredSession]:
        """Yield each record whose TTL runs out from now on, on any node.

        Driven by the server's TTL markers, so an expiry is reported about
        one whole second after the record's last write plus its TTL rounded
        up. Removals are not expiries. Starting the iteration reads the
        header of every record once (to know which keys are removed). Ends
        when the registry stops. With a SessionKVStore, only this node's
        sessions are watched, by polling.
        """
        storage = self._storage()
        source = self._watch_expired(storage) if storage.watches else self._poll_expired()
        async for item in self._until_stopped(source):
            yield item

    async def _watch_expired(self, storage: RegistryBackend) -> AsyncIterator[ExpiredSession]:
        since = await storage.revision()
        # A removal's delete marker expires too, and the server marks that
        # exactly like a record's expiry: remember which keys were removed.
        removed: set[str] = set()
        async for event in storage.watch(self._names.registry_record_filter,
                                         include_existing=True):
            if event.op is KVOp.PUT:
                removed.discard(event.key)
            elif event.op is not KVOp.EXPIRED:
                removed.add(event.key)
            elif event.key in removed:
                removed.discard(event.key)
            elif event.revision > since:
                try:
                    yield ExpiredSession(*self._names.registry_ids_of_key(event.key))
                except InvalidIdError:
                    continue

    async def _poll_expired(self) -> AsyncIterator[ExpiredSession]:
        reported: set[str] = set()
        while True:
            storage = self._storage()
            for key, written in list(self._written.items()):
                head = await storage.head(key)
                alive = False
                if head.state is HeadState.LIVE:
                    with contextlib.suppress(CorruptRecord):
                        alive = self._alive(decode_record(key, head.value)[1])
                if alive or head.state is HeadState.REMOVED:
                    reported.discard(key)
                elif key not in reported:
                    reported.add(key)
                    yield ExpiredSession(written.call_id, written.session_id)
            await asyncio.sleep(self._poll_interval)

    # -- callbacks ------------------------------------------------------------

    def on_close_request(
        self, callback: Callable[[str], Awaitable[None] | None]
    ) -> asyncio.Task[None]:
        """Call ``callback(session_id)`` for each :meth:`close_requests` item until stop."""
        return self._spawn(self.close_requests(), callback)

    def on_expired(
        self, callback: Callable[[ExpiredSession], Awaitable[None] | None]
    ) -> asyncio.Task[None]:
        """Call ``callback(expired_session)`` for each :meth:`expired` item until stop."""
        return self._spawn(self.expired(), callback)

    def _spawn(
        self, source: AsyncIterator[T], callback: Callable[[T], Awaitable[None] | None]
    ) -> asyncio.Task[None]:
        self._storage()

        async def run() -> None:
            async for item in source:
                try:
                    result = callback(item)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    logger.exception("registry callback %r failed on %r", callback, item)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- internals ------------------------------------------------------------

    async def _until_stopped(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        # Each item is awaited in a task of its own so stop() can end a wait
        # that may last forever (a watch with nothing new to say).
        stop = asyncio.ensure_future(self._stopped.wait())
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

    def _alive(self, body: Mapping[str, Any], now: float | None = None) -> bool:
        deadline = expires_at(body)
        return deadline is not None and deadline > (time.time() if now is None else now)

    @staticmethod
    def _check_names(
        key: str, info: SessionInfo, call_id: str, session_id: str, raw: bytes
    ) -> None:
        if info.call_id != call_id or info.session_id != session_id:
            raise CorruptRecord(key, "the record names another session", raw)

    def _prune(self) -> None:
        # Forget sessions this registry wrote but no longer heartbeats, so the
        # map stays bounded by the sessions this node really hosts.
        now = time.monotonic()
        if now - self._last_prune < self._ttl:
            return
        self._last_prune = now
        horizon = now - max(4 * self._ttl, _MIN_TOMBSTONE_TTL)
        for key in [k for k, w in self._written.items() if w.touched < horizon]:
            del self._written[key]

    def __repr__(self) -> str:
        state = "started" if self.started else "stopped" if self._stopped.is_set() else "new"
        return f"<SessionRegistry node={self._node_id} ttl={self._ttl} {state}>"
