"""SessionRegistry: which node hosts which session, shared by every node.

The API of the Vision Agents ``SessionRegistry``, on the bus. A record per
session (its call, hosting node, start time, metrics) lives in the bus's
registry bucket under ``<call>.<session>`` with a per-key TTL; the node
hosting the session keeps it alive with :meth:`SessionRegistry.refresh` or
:meth:`SessionRegistry.update_metrics`. Past the original:

* A heartbeat that finds its record expired re-creates it (or, with
  ``recreate_expired=False``, raises :class:`~sessionbus.bus.errors.SessionExpired`),
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
* Vision Agents' current API works too: :meth:`update_metrics` takes its
  ``AgentMetrics`` (any object with ``to_dict``/``from_dict``) as well as a
  dict, and reads hand the object back wherever its class is loaded; a
  stopped registry starts again (the launcher's start/stop/start), and any
  call starts a registry that was not started.

Any :class:`~sessionbus.bus.SessionKVStore` works as the store too, with weaker
guarantees: no compare-and-set (a heartbeat racing a removal can re-create
the record), and :meth:`close_requests` / :meth:`expired` poll this node's
sessions every ``poll_interval`` seconds instead of being pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Self

from sessionbus.bus._names import Names, validate_id
from sessionbus.bus._registry_backends import BucketBackend, RegistryBackend, StoreBackend
from sessionbus.bus._registry_feeds import (
    poll_close_flags,
    poll_expiries,
    run_callback,
    until_set,
    watch_close_flags,
    watch_expiries,
)
from sessionbus.bus._registry_record import (
    ExpiredSession,
    check_names,
    decode_record,
    is_alive,
    validate_metrics,
)
from sessionbus.bus._registry_writer import RecordWriter
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import (
    BusClosedError,
    ConfigError,
    CorruptRecord,
    InvalidIdError,
    SessionExpired,
)
from sessionbus.bus.registry_store import SessionKVStore
from sessionbus.bus.settings import check_ttl
from sessionbus.schemas.codec import encode
from sessionbus.schemas.session import SessionInfo

__all__ = ["ExpiredSession", "SessionRegistry"]

logger = logging.getLogger(__name__)

#: Metrics as a dict, or an object with ``to_dict()`` (Vision Agents' AgentMetrics).
MetricsLike = Mapping[str, int | float | None] | Any


def _loaded_metrics_type(name: str) -> type | None:
    """The class ``module:qualname`` if this process already loaded it (never imports)."""
    module_name, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj if isinstance(obj, type) and callable(getattr(obj, "from_dict", None)) else None


#: Heartbeats one refresh() keeps in flight.
_REFRESH_CONCURRENCY = 64
#: A removal's delete marker lasts at least this long (seconds).
_MIN_TOMBSTONE_TTL = 60.0


class SessionRegistry:
    """A multi-node session registry over a shared KV store.

    ``store`` is a started :class:`~sessionbus.bus.SessionBus` (records live in its
    registry bucket), any :class:`~sessionbus.bus.SessionKVStore`, or None: then
    :meth:`start` starts a ``SessionBus()`` of its own (the embedded server,
    or ``SESSIONBUS_URL``) and :meth:`stop` closes it. ``ttl`` is how long a
    record lives without a heartbeat (seconds, > 0, fractions honoured).

    With ``recreate_expired`` (the default) a heartbeat that finds its
    record expired writes it again; without, it raises
    :class:`~sessionbus.bus.errors.SessionExpired`. ``tombstone_ttl`` is how long a
    removal is remembered so heartbeats do not undo it (default: the larger
    of 60 s and twice ``ttl``). ``poll_interval`` only matters for a
    SessionKVStore, which cannot push changes.

    On a replicated bucket, reads are Direct Gets any replica may answer,
    so a read can trail a write by a few milliseconds, and reads pause
    (rather than fail) while a lost stream leader is replaced. Heartbeats
    are compare-and-set, so a stale read costs a retry, never a lost write.

    Ids are validated before any I/O (:class:`~sessionbus.bus.errors.InvalidIdError`).
    :meth:`get` raises :class:`~sessionbus.bus.errors.CorruptRecord` (a DecodeError,
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
        metrics_type: type | None = None,
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
        self._names = store.names if isinstance(store, SessionBus) else Names()
        self._backend: RegistryBackend | None = None
        self._own_bus: SessionBus | None = None
        self._writer = RecordWriter(
            node_id=self._node_id, ttl=checked, recreate_expired=bool(recreate_expired),
            forget_after=max(4 * checked, _MIN_TOMBSTONE_TTL),
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._start_lock = asyncio.Lock()
        self._service_added = False
        self._metrics_types: dict[str, type] = {}
        if metrics_type is not None:
            self._learn_metrics_type(metrics_type)

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
        """Open the store (starting a bus of its own when given none).

        A stopped registry may be started again; any method starts a
        registry that was never started (or was stopped) on first use.
        """
        async with self._start_lock:
            if self._backend is not None:
                return
            self._stopped = asyncio.Event()
            store = self._store
            if store is None:
                self._own_bus = store = SessionBus()
                self._names = store.names
                await store.start()
            if isinstance(store, SessionBus):
                if not store.started:
                    raise BusClosedError("the registry's SessionBus is not started")
                backend: RegistryBackend = BucketBackend(store.registry_kv, store.names)
                if store is not self._own_bus and not self._service_added:
                    store.add_service(self)  # the bus's close() stops this registry first
                    self._service_added = True
            else:
                backend = StoreBackend(store, self._names)
                await backend.start()
            self._backend = backend

    async def stop(self) -> None:
        """End the iterators and callbacks, close the store (or the bus it started).

        :meth:`start` (or any use) opens it again.
        """
        if self._stopped.is_set() or self._backend is None:
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
        own, self._own_bus = self._own_bus, None
        if own is not None:
            await own.close()

    def _storage(self) -> RegistryBackend:
        if self._backend is None or self._stopped.is_set():
            raise BusClosedError("the registry is not started (use 'async with SessionRegistry()')")
        return self._backend

    async def _ready(self) -> RegistryBackend:
        """The open backend, starting the registry if it is not."""
        if self._backend is None or self._stopped.is_set():
            await self.start()
        return self._storage()

    # -- records --------------------------------------------------------------

    async def register(self, call_id: str, session_id: str) -> None:
        """Write a new record for a session hosted on this node (replacing any)."""
        key = self._names.registry_key(call_id, session_id)
        await self._writer.register(await self._ready(), key, call_id, session_id)

    async def remove(self, call_id: str, session_id: str) -> None:
        """Delete a session's record and close flag.

        Both keys keep a delete marker for ``tombstone_ttl`` seconds: a
        heartbeat that arrives meanwhile sees the removal and does nothing.
        """
        key = self._names.registry_key(call_id, session_id)
        close_key = self._names.registry_close_key(call_id, session_id)
        storage = await self._ready()
        self._writer.forget(key)
        await asyncio.gather(
            storage.tombstone(key, self._tombstone_ttl),
            storage.tombstone(close_key, self._tombstone_ttl),
        )

    async def get(self, call_id: str, session_id: str) -> SessionInfo | None:
        """The session's record, or None if absent, removed or past its ``expires_at``.

        Raises :class:`~sessionbus.bus.errors.CorruptRecord` if the stored value is not a record.
        """
        key = self._names.registry_key(call_id, session_id)
        raw = await (await self._ready()).read(key)
        if raw is None:
            return None
        info, body = decode_record(key, raw)
        check_names(key, info, call_id, session_id, raw)
        return self._typed(info, body) if is_alive(body) else None

    async def get_for_call(self, call_id: str) -> list[SessionInfo]:
        """Every live session of one call, on any node, listed by a server-side filter.

        Values that do not decode are skipped with a warning.
        """
        self._names.registry_call_filter(call_id)  # validates before any I/O
        out: list[SessionInfo] = []
        for key, raw in await (await self._ready()).list_call(call_id):
            try:
                info, body = decode_record(key, raw)
                _, session_id = self._names.registry_ids_of_key(key)
                check_names(key, info, call_id, session_id, raw)
            except (CorruptRecord, InvalidIdError) as e:
                logger.warning("skipping registry record %r: %s", key, e)
                continue
            if is_alive(body):
                out.append(self._typed(info, body))
        out.sort(key=lambda i: (i.started_at, i.session_id))
        return out

    # -- heartbeats -----------------------------------------------------------

    async def update_metrics(
        self, call_id: str, session_id: str, metrics: MetricsLike
    ) -> None:
        """Replace a session's metrics and restart its TTL.

        ``metrics`` is a dict of str -> int | float | None, or an object with
        ``to_dict()`` giving one (Vision Agents' ``AgentMetrics``): then
        :meth:`get` and :meth:`get_for_call` hand such objects back, built
        with the class's ``from_dict``, in every process where that class is
        loaded. Raises :class:`~sessionbus.bus.errors.InvalidMetrics` for
        anything else. An expired record is re-created (or SessionExpired
        raised, see the class); a removed one is left alone.
        """
        kind: str | None = None
        if not isinstance(metrics, Mapping) and callable(getattr(metrics, "to_dict", None)):
            kind = self._learn_metrics_type(type(metrics))
            metrics = metrics.to_dict()
        checked = validate_metrics(metrics)
        key = self._names.registry_key(call_id, session_id)
        await self._writer.heartbeat(await self._ready(), key, call_id, session_id, checked,
                                     metrics_type=kind)

    def _learn_metrics_type(self, cls: type) -> str | None:
        """Remember a metrics class by its qualified name; None if it cannot rebuild itself."""
        if not callable(getattr(cls, "from_dict", None)):
            return None
        name = f"{cls.__module__}:{cls.__qualname__}"
        self._metrics_types[name] = cls
        return name

    def _typed(self, info: SessionInfo, body: Mapping[str, Any]) -> SessionInfo:
        """``info`` with its metrics as the object type they were written from, if known here."""
        name = body.get("metrics_type")
        if not isinstance(name, str):
            return info
        cls = self._metrics_types.get(name) or _loaded_metrics_type(name)
        if cls is None:
            return info
        try:
            typed = cls.from_dict(dict(info.metrics))  # type: ignore[attr-defined]
        except Exception as e:  # a foreign class that cannot read the dict: keep the dict
            logger.warning("metrics of %s do not load as %s: %s", info.session_id, name, e)
            return info
        return info.model_copy(update={"metrics": typed})

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
        storage = await self._ready()
        limit = asyncio.Semaphore(_REFRESH_CONCURRENCY)

        async def one(key: str, call_id: str, sid: str) -> None:
            async with limit:
                await self._writer.heartbeat(storage, key, call_id, sid, None)

        results = await asyncio.gather(*(one(*k) for k in keys), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        errors.sort(key=lambda e: isinstance(e, SessionExpired))
        if errors:
            raise errors[0]

    # -- close requests -------------------------------------------------------

    async def request_close(self, call_id: str, session_id: str) -> None:
        """Set a session's close flag, from any node; it lives ``ttl`` seconds."""
        key = self._names.registry_close_key(call_id, session_id)
        value = encode({"requested_at": time.time(), "node_id": self._node_id})
        await (await self._ready()).put(key, value, self._ttl)

    async def get_close_requests(self, sessions: Mapping[str, str]) -> list[str]:
        """The ids among ``sessions`` (session id -> call id) with a close flag set."""
        if not isinstance(sessions, Mapping):
            raise ConfigError(f"sessions must be a dict of session id -> call id, not "
                              f"{type(sessions).__name__}")
        ids = list(sessions)
        keys = [self._names.registry_close_key(sessions[sid], sid) for sid in ids]
        values = await (await self._ready()).read_many(keys)
        return [sid for sid, value in zip(ids, values, strict=True) if value is not None]

    async def close_requests(self) -> AsyncIterator[str]:
        """Yield the id of each session hosted on this node when a close is requested.

        Flags already set when iteration starts come first. A session is
        this node's if this registry wrote its record, or if its record
        names this node. Ends when the registry stops.
        """
        storage = await self._ready()
        if storage.watches:
            source = self._own_close_flags(storage)
        else:
            source = poll_close_flags(self._flagged_here, self._poll_interval)
        async for session_id in until_set(self._stopped, source):
            yield session_id

    async def _own_close_flags(self, storage: RegistryBackend) -> AsyncIterator[str]:
        async for call_id, session_id in watch_close_flags(storage, self._names):
            if await self._is_mine(call_id, session_id):
                yield session_id

    async def _flagged_here(self) -> list[str]:
        return await self.get_close_requests(
            {sid: call_id for _, call_id, sid in self._writer.sessions()}
        )

    async def _is_mine(self, call_id: str, session_id: str) -> bool:
        key = self._names.registry_key(call_id, session_id)
        if key in self._writer.written:
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
        storage = await self._ready()
        if storage.watches:
            source = watch_expiries(storage, self._names)
        else:
            source = poll_expiries(storage, self._writer.sessions, self._poll_interval)
        async for item in until_set(self._stopped, source):
            yield item

    # -- callbacks ------------------------------------------------------------

    def on_close_request(
        self, callback: Callable[[str], Awaitable[None] | None]
    ) -> asyncio.Task[None]:
        """Call ``callback(session_id)`` for each :meth:`close_requests` item until stop.

        ``callback`` may be plain or async; its errors are logged.
        """
        return self._spawn(run_callback(self.close_requests(), callback))

    def on_expired(
        self, callback: Callable[[ExpiredSession], Awaitable[None] | None]
    ) -> asyncio.Task[None]:
        """Call ``callback(expired_session)`` for each :meth:`expired` item until stop."""
        return self._spawn(run_callback(self.expired(), callback))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        try:
            self._storage()
        except BusClosedError:
            coro.close()
            raise
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- internals ------------------------------------------------------------

    def __repr__(self) -> str:
        state = "started" if self.started else "stopped" if self._stopped.is_set() else "new"
        return f"<SessionRegistry node={self._node_id} ttl={self._ttl} {state}>"
