"""Where a :class:`~sessionbus.bus.SessionRegistry` keeps its records.

A JetStream bucket or a plain store.

Both backends offer the same few operations on encoded records, so the
registry's logic is written once:

* :class:`BucketBackend` (a :class:`~sessionbus.bus.SessionBus`'s registry bucket):
  writes are compare-and-set on the key's revision, a removal is a delete
  marker that expires on its own, a call's sessions are listed by a subject
  filter on the server, and close flags and expiry markers are pushed
  through :meth:`BucketBackend.watch`.
* :class:`StoreBackend` (any :class:`~sessionbus.bus.SessionKVStore`): no revisions,
  so writes are plain upserts; a removal is a tombstone value with a TTL;
  there is no change feed (``watches`` is False) and the registry polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sessionbus.bus._kv import Bucket, KVEvent, KVOp
from sessionbus.bus._names import Names
from sessionbus.bus.registry_store import SessionKVStore
from sessionbus.schemas.codec import encode

#: Concurrent reads one ``read_many`` keeps in flight.
_READ_CONCURRENCY = 64


class HeadState(StrEnum):
    """What a key's last write says about a session record."""

    #: A value is stored (its own ``expires_at`` may still have passed).
    LIVE = "live"
    #: The record was removed; its tombstone has not expired yet.
    REMOVED = "removed"
    #: Nothing is stored: never written, or expired.
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class Head:
    """A key's state, value (LIVE only) and the revision a compare-and-set must name."""

    state: HeadState
    value: bytes = b""
    revision: int = 0


class RegistryBackend(Protocol):
    """The operations :class:`~sessionbus.bus.SessionRegistry` needs from its storage."""

    #: Whether :meth:`watch` pushes changes (else the registry polls).
    watches: bool

    async def start(self) -> None:
        """Open the storage."""

    async def close(self) -> None:
        """Close the storage."""

    async def read(self, key: str) -> bytes | None:
        """The stored value, None if absent, expired or removed."""

    async def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """:meth:`read` of every key, in order."""

    async def head(self, key: str) -> Head:
        """The key's state for a compare-and-set write."""

    async def list_call(self, call_id: str) -> list[tuple[str, bytes]]:
        """``(key, value)`` of every stored session record of one call."""

    async def put(self, key: str, value: bytes, ttl: float) -> int:
        """Write unconditionally; returns the new revision (0 without revisions)."""

    async def write(self, key: str, value: bytes, ttl: float, *, last: int) -> int:
        """Write if the key is still at revision ``last``, else raise KeyConflict."""

    async def tombstone(self, key: str, ttl: float) -> None:
        """Mark the key removed for ``ttl`` seconds."""

    async def revision(self) -> int:
        """The storage's latest revision (0 without revisions)."""

    def watch(
        self, key_filter: str, *, include_existing: bool, ready: asyncio.Event | None = None
    ) -> AsyncIterator[KVEvent]:
        """Changes of keys matching ``key_filter`` (only when ``watches``)."""


class BucketBackend:
    """Registry records in a JetStream KV bucket."""

    watches = True

    def __init__(self, bucket: Bucket, names: Names) -> None:
        self.bucket = bucket
        self.names = names

    async def start(self) -> None:
        """The bus that owns the bucket is already started."""

    async def close(self) -> None:
        """The bus that owns the bucket closes it."""

    async def read(self, key: str) -> bytes | None:
        """The stored value, None if absent, expired or removed."""
        entry = await self.bucket.get(key)
        return None if entry is None else entry.value

    async def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Direct gets of every key, a bounded number in flight."""
        limit = asyncio.Semaphore(_READ_CONCURRENCY)

        async def one(key: str) -> bytes | None:
            async with limit:
                return await self.read(key)

        return list(await asyncio.gather(*(one(k) for k in keys)))

    async def head(self, key: str) -> Head:
        """The last message on the key: a value, a delete marker or an expiry marker."""
        event = await self.bucket.head(key)
        if event is None:
            return Head(HeadState.GONE)
        if event.op is KVOp.PUT:
            return Head(HeadState.LIVE, event.value, event.revision)
        if event.op is KVOp.EXPIRED:
            return Head(HeadState.GONE, revision=event.revision)
        return Head(HeadState.REMOVED, revision=event.revision)

    async def list_call(self, call_id: str) -> list[tuple[str, bytes]]:
        """A server-side filtered listing: ``<call>.*`` matches records, never close flags."""
        entries = await self.bucket.list(self.names.registry_call_filter(call_id))
        return [(e.key, e.value) for e in entries]

    async def put(self, key: str, value: bytes, ttl: float) -> int:
        """Write unconditionally."""
        return await self.bucket.put(key, value, ttl=ttl)

    async def write(self, key: str, value: bytes, ttl: float, *, last: int) -> int:
        """Compare-and-set on the key's revision (``Nats-Expected-Last-Subject-Sequence``)."""
        return await self.bucket.update(key, value, last=last, ttl=ttl)

    async def tombstone(self, key: str, ttl: float) -> None:
        """A delete marker that goes away by itself after ``ttl``."""
        await self.bucket.delete(key, ttl=ttl)

    async def revision(self) -> int:
        """The bucket stream's last sequence."""
        return await self.bucket.revision()

    def watch(
        self, key_filter: str, *, include_existing: bool, ready: asyncio.Event | None = None
    ) -> AsyncIterator[KVEvent]:
        """Headers-only changes (the registry needs keys and operations, not values)."""
        return self.bucket.watch(
            key_filter, include_existing=include_existing, meta_only=True, ready=ready
        )


#: The value a :class:`StoreBackend` writes in place of a removed record.
TOMBSTONE = encode({"removed": True})


class StoreBackend:
    """Registry records in a :class:`~sessionbus.bus.SessionKVStore`.

    No revisions, no change feed.
    """

    watches = False

    def __init__(self, store: SessionKVStore, names: Names) -> None:
        self.store = store
        self.names = names

    async def start(self) -> None:
        """Call the store's ``start()`` if it has one."""
        start = getattr(self.store, "start", None)
        if start is not None:
            await start()

    async def close(self) -> None:
        """Call the store's ``close()`` if it has one."""
        close = getattr(self.store, "close", None)
        if close is not None:
            await close()

    async def read(self, key: str) -> bytes | None:
        """The stored value, None if absent, expired or a tombstone."""
        value = await self.store.get(key)
        return None if value is None or value == TOMBSTONE else value

    async def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``mget``."""
        if not keys:
            return []
        values = await self.store.mget(list(keys))
        return [None if v is None or v == TOMBSTONE else v for v in values]

    async def head(self, key: str) -> Head:
        """The stored value's state; revisions are always 0."""
        value = await self.store.get(key)
        if value is None:
            return Head(HeadState.GONE)
        if value == TOMBSTONE:
            return Head(HeadState.REMOVED)
        return Head(HeadState.LIVE, value)

    async def list_call(self, call_id: str) -> list[tuple[str, bytes]]:
        """Keys under ``<call>.`` with exactly one more token (records, not close flags)."""
        prefix = self.names.registry_call_filter(call_id)[:-1]
        keys = [k for k in await self.store.keys(prefix) if "." not in k[len(prefix):]]
        values = await self.read_many(keys)
        return [(k, v) for k, v in zip(keys, values, strict=True) if v is not None]

    async def put(self, key: str, value: bytes, ttl: float) -> int:
        """An upsert."""
        await self.store.set(key, value, ttl)
        return 0

    async def write(self, key: str, value: bytes, ttl: float, *, last: int) -> int:
        """An upsert: the store cannot compare revisions, so ``last`` is not checked."""
        await self.store.set(key, value, ttl)
        return 0

    async def tombstone(self, key: str, ttl: float) -> None:
        """A tombstone value with its own TTL."""
        await self.store.set(key, TOMBSTONE, ttl)

    async def revision(self) -> int:
        """Stores have no revisions."""
        return 0

    def watch(
        self, key_filter: str, *, include_existing: bool, ready: asyncio.Event | None = None
    ) -> AsyncIterator[KVEvent]:
        """Never called: ``watches`` is False."""
        raise NotImplementedError("a SessionKVStore has no change feed")
