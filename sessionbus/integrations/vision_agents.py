"""Vision Agents' session registry storage on the bus: :class:`NatsSessionKVStore`.

Vision Agents' ``SessionRegistry(store=...)`` keeps which node hosts which
agent session in a ``SessionKVStore`` (a TTL key-value store of bytes). This
module's store keeps it in a JetStream KV bucket of the bus, so every node
of a deployment shares it with no other service to run::

    from vision_agents.core.agents.session_registry import SessionRegistry
    from sessionbus.integrations.vision_agents import NatsSessionKVStore

    registry = SessionRegistry(store=NatsSessionKVStore("nats://nats:4222"))

What the store guarantees:

* TTLs are exact to the clock, fractions included: the deadline travels in
  the value and readers check it; the server's per-key TTL (whole seconds,
  rounded up) removes the key shortly after.
* ``set(..., only_if_exists=True)`` and ``expire`` are compare-and-set on
  the key's revision, so they never resurrect a key another node deleted or
  that expired between the read and the write.
* ``keys(prefix)`` is filtered by the server on the key's ``/``-separated
  segments: listing one call's sessions reads only that call's keys.
* ``mget`` is one Direct Get request per 256 keys; ``mset``, ``expire`` and
  ``delete`` keep their writes in flight together.

Keys may hold any characters: each ``/``-separated segment that is not
plain ``[A-Za-z0-9_-]`` is stored base64url-encoded behind ``=``, so a
segment never splits a subject or becomes a wildcard.

Importing this module works without Vision Agents installed; with it, the
store is a subclass of its ``SessionKVStore``.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from sessionbus.bus._jsapi import TooManyResultsError, direct_get_last_for_subjects
from sessionbus.bus._kv import Bucket
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusClosedError, ConcurrentUpdate, ConfigError, KeyConflict
from sessionbus.integrations._bus import BusLink, ensure_bucket
from sessionbus.integrations._keys import decode_key, encode_key, token

if TYPE_CHECKING:
    _Base = object
else:
    try:
        from vision_agents.core.agents.session_registry.store import SessionKVStore as _Base
    except ImportError:  # Vision Agents not installed: a plain, duck-typed store
        _Base = object

__all__ = ["NatsSessionKVStore", "decode_key", "encode_key"]

_T = TypeVar("_T")

#: Values are stored as this magic, the deadline (a big-endian double, wall
#: clock seconds), then the caller's bytes.
_MAGIC = b"SBKV\x01"
_HEAD = struct.Struct(">d")
#: Writes (or reads) one call keeps in flight.
_CONCURRENCY = 64
#: Keys per Direct Get request of ``mget``.
_MGET_PAGE = 256
#: Compare-and-set attempts before ConcurrentUpdate.
_CAS_ATTEMPTS = 64
#: How long a delete marker stays before the server removes it.
_DELETE_MARKER_TTL = 60.0


def _check_ttl(ttl: object) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ConfigError(f"ttl must be a number > 0, got {ttl!r}")
    return float(ttl)


def _pack(value: bytes, ttl: float) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"a value must be bytes, not {type(value).__name__}")
    return _MAGIC + _HEAD.pack(time.time() + ttl) + bytes(value)


def _unpack(raw: bytes, now: float) -> bytes | None:
    """The caller's bytes in a stored value, None once its deadline passed."""
    if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + _HEAD.size:
        return raw  # written by something else: no deadline of ours
    (deadline,) = _HEAD.unpack_from(raw, len(_MAGIC))
    if deadline <= now:
        return None
    return raw[len(_MAGIC) + _HEAD.size:]


class NatsSessionKVStore(_Base):
    """A Vision Agents ``SessionKVStore`` in a JetStream KV bucket of the bus.

    ``bus`` is a started :class:`~sessionbus.bus.SessionBus` the caller owns.
    Without one, :meth:`start` (or the first operation) connects
    ``SessionBus(servers, **options)`` (``SESSIONBUS_URL`` or the embedded
    server when ``servers`` is None) and :meth:`close` closes it; the store
    may be started again after a close.
    ``bucket`` names the KV bucket (default ``<prefix>_va_sessions``), created
    with per-key TTLs if absent. Keys, values and TTLs are those of the
    interface: str, bytes and seconds > 0.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        bus: SessionBus | None = None,
        bucket: str | None = None,
        **options: Any,
    ) -> None:
        if bus is not None and (servers is not None or options):
            raise ConfigError("pass either a started bus or connection settings, not both")
        self._link = BusLink(bus, servers, options)
        self._bucket_name = bucket
        self._bucket: Bucket | None = None

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Connect (if the store has its own bus) and bind or create the bucket."""
        if self._bucket is not None:
            return
        bus = await self._link.open()
        name = self._bucket_name or bus.names.va_sessions_bucket
        self._bucket = await ensure_bucket(bus, name)

    async def close(self) -> None:
        """Unbind the bucket and close the store's own bus; the data stays in the bucket."""
        self._bucket = None
        await self._link.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _ready(self) -> Bucket:
        """The bound bucket, starting the store on first use."""
        if self._bucket is None:
            await self.start()
        assert self._bucket is not None
        return self._bucket

    @property
    def bucket(self) -> Bucket:
        """The bound bucket; BusClosedError before the store is started."""
        if self._bucket is None:
            raise BusClosedError("the store is not started (call start() or use 'async with')")
        return self._bucket

    # -- writes -------------------------------------------------------------------

    async def set(
        self, key: str, value: bytes, ttl: float, *, only_if_exists: bool = False
    ) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (an upsert).

        With ``only_if_exists`` the write happens only if the key is live,
        as one compare-and-set on the revision read.
        """
        stored = encode_key(key)
        checked = _check_ttl(ttl)
        data = bytes(value) if isinstance(value, bytearray | memoryview) else value
        if not only_if_exists:
            await (await self._ready()).put(stored, _pack(data, checked), ttl=checked)
            return
        await self._rewrite(stored, lambda _: data, checked)

    async def mset(self, items: list[tuple[str, bytes, float]]) -> None:
        """:meth:`set` every ``(key, value, ttl)``, the writes in flight together."""
        checked = [(encode_key(k), _pack(v, _check_ttl(t)), float(t)) for k, v, t in items]
        bucket = await self._ready()
        await _bounded(bucket.put(k, v, ttl=t) for k, v, t in checked)

    async def expire(self, *keys: str, ttl: float) -> None:
        """Give each live key of ``keys`` a new TTL, value unchanged; others are ignored."""
        stored = [encode_key(k) for k in keys]
        checked = _check_ttl(ttl)
        await _bounded(self._rewrite(k, lambda old: old, checked) for k in stored)

    async def delete(self, keys: list[str]) -> None:
        """Remove ``keys``; absent ones are ignored."""
        stored = [encode_key(k) for k in keys]
        bucket = await self._ready()
        await _bounded(bucket.delete(k, ttl=_DELETE_MARKER_TTL) for k in stored)

    async def _rewrite(self, stored: str, value: Callable[[bytes], bytes], ttl: float) -> None:
        """Write ``value(current)`` if the key is live, compare-and-set on its revision."""
        bucket = await self._ready()
        for attempt in range(_CAS_ATTEMPTS):
            entry = await bucket.get(stored)
            if entry is None:
                return
            current = _unpack(entry.value, time.time())
            if current is None:
                return
            try:
                await bucket.update(stored, _pack(value(current), ttl), last=entry.revision,
                                    ttl=ttl)
                return
            except KeyConflict:  # written or deleted meanwhile: read again
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
        raise ConcurrentUpdate(decode_key(stored), _CAS_ATTEMPTS)

    # -- reads ----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None if absent or expired."""
        entry = await (await self._ready()).get(encode_key(key))
        return None if entry is None else _unpack(entry.value, time.time())

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        """The values of ``keys`` in order, None where absent or expired."""
        if not keys:
            return []
        stored = [encode_key(k) for k in keys]
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(stored))
        pages = [unique[i:i + _MGET_PAGE] for i in range(0, len(unique), _MGET_PAGE)]
        for page in await _bounded(self._get_page(p) for p in pages):
            found.update(page)
        now = time.time()
        return [None if (raw := found.get(k)) is None else _unpack(raw, now) for k in stored]

    async def _get_page(self, stored: list[str]) -> dict[str, bytes]:
        bucket = await self._ready()
        pre = f"$KV.{bucket.name}."
        api_prefix = f"$JS.{bucket.domain}.API" if bucket.domain else "$JS.API"
        try:
            msgs = await direct_get_last_for_subjects(
                bucket.nc, stream=bucket.stream, subjects=[pre + k for k in stored],
                api_prefix=api_prefix, replies=bucket.replies,
            )
        except TooManyResultsError:  # cannot happen below 1024 keys; be safe anyway
            values = await _bounded(bucket.get(k) for k in stored)
            return {k: e.value for k, e in zip(stored, values, strict=True) if e is not None}
        out: dict[str, bytes] = {}
        for m in msgs:
            op = (m.headers or {}).get("KV-Operation")
            marker = (m.headers or {}).get("Nats-Marker-Reason")
            if op is None and marker is None:
                out[m.subject[len(pre):]] = m.data or b""
        return out

    async def keys(self, prefix: str) -> list[str]:
        """Every live key starting with ``prefix``, listed by a server-side filter."""
        if not isinstance(prefix, str):
            raise TypeError(f"a prefix must be a str, not {type(prefix).__name__}")
        *whole, _partial = prefix.split("/")
        key_filter = ".".join([*(token(s) for s in whole), ">"])
        now = time.time()
        out: list[str] = []
        for entry in await (await self._ready()).list(key_filter):
            try:
                key = decode_key(entry.key)
            except ValueError:
                continue
            if key.startswith(prefix) and _unpack(entry.value, now) is not None:
                out.append(key)
        return out

    def __repr__(self) -> str:
        state = "started" if self._bucket is not None else "closed"
        name = self._bucket.name if self._bucket is not None else self._bucket_name
        return f"<NatsSessionKVStore bucket={name!r} {state}>"


async def _bounded(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await every awaitable, at most ``_CONCURRENCY`` at a time, results in order."""
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def one(aw: Awaitable[_T]) -> _T:
        async with limit:
            return await aw

    return list(await asyncio.gather(*(one(a) for a in aws)))

