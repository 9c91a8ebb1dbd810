"""The key-value interface a :class:`~sessionbus.bus.SessionRegistry` runs on, and an in-memory one.

:class:`SessionKVStore` is the storage interface of the multi-node
registries this package is compatible with (a TTL key-value store: ``set``
with a TTL, ``mset``, ``expire``, ``get``, ``mget``, ``keys(prefix)``,
``delete``), so a store written for them plugs in unchanged. Such a store
has no compare-and-set and no change feed: the registry then polls for close
requests and expiries (see :class:`~sessionbus.bus.SessionRegistry`). On a
:class:`~sessionbus.bus.SessionBus` the registry uses the bus's JetStream bucket
directly instead, with compare-and-set and server-pushed changes.

:class:`InMemorySessionKVStore` keeps everything in this process: for one
node, development and tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from sessionbus.bus.settings import check_ttl

__all__ = ["InMemorySessionKVStore", "SessionKVStore"]


@runtime_checkable
class SessionKVStore(Protocol):
    """A TTL key-value store of bytes, shared by every node of a registry.

    Keys are strings, values bytes, TTLs seconds (> 0, may be fractional).
    A key whose TTL has run out reads as absent. ``start()`` and ``close()``
    are optional: the registry calls them if the store has them.
    """

    async def set(
        self, key: str, value: bytes, ttl: float, *, only_if_exists: bool = False
    ) -> bool | None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (an upsert).

        With ``only_if_exists`` nothing is written unless the key is
        present. Returns whether it was written (None: the store does not say).
        """
        ...

    async def mset(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        """:meth:`set` each ``(key, value, ttl)``."""
        ...

    async def expire(self, *keys: str, ttl: float) -> None:
        """Give existing ``keys`` a new TTL, values unchanged; absent keys are ignored."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None if absent or expired."""
        ...

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in order, None for each absent one."""
        ...

    async def keys(self, prefix: str) -> list[str]:
        """Every live key starting with ``prefix``."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove ``keys``; absent keys are ignored."""
        ...


class InMemorySessionKVStore:
    """A :class:`SessionKVStore` in this process's memory, TTLs honoured exactly.

    Expired keys read as absent at once and are dropped on access and by a
    sweep every ``sweep_every`` writes, so memory stays bounded by the live
    keys. ``clock`` (seconds, monotonic) is replaceable for tests.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, sweep_every: int = 1024
    ) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}
        self._sweep_every = max(1, sweep_every)
        self._writes = 0

    def __len__(self) -> int:
        """Keys held, expired ones not yet swept included."""
        return len(self._data)

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close; the data stays until the object goes."""

    def _live(self, key: str, now: float) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._data[key]
            return None
        return item[0]

    def _write(self, key: str, value: bytes, ttl: float, now: float) -> None:
        checked = check_ttl(ttl)
        assert checked is not None
        self._data[key] = (bytes(value), now + checked)
        self._writes += 1
        if self._writes % self._sweep_every == 0:
            self.sweep()

    def sweep(self) -> int:
        """Drop every expired key now; returns how many were dropped."""
        now = self._clock()
        dead = [k for k, (_, deadline) in self._data.items() if deadline <= now]
        for key in dead:
            del self._data[key]
        return len(dead)

    async def set(
        self, key: str, value: bytes, ttl: float, *, only_if_exists: bool = False
    ) -> bool:
        """Store ``value`` for ``ttl`` seconds; see :meth:`SessionKVStore.set`."""
        now = self._clock()
        if only_if_exists and self._live(key, now) is None:
            return False
        self._write(key, value, ttl, now)
        return True

    async def mset(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        """Store every ``(key, value, ttl)``."""
        now = self._clock()
        for _, _, ttl in items:
            check_ttl(ttl)
        for key, value, ttl in items:
            self._write(key, value, ttl, now)

    async def expire(self, *keys: str, ttl: float) -> None:
        """Restart the TTL of every live key in ``keys`` (given one by one, as in VA)."""
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"expire(*keys, ttl): a key must be a str, not "
                                f"{type(key).__name__}")
        checked = check_ttl(ttl)
        assert checked is not None
        now = self._clock()
        for key in keys:
            value = self._live(key, now)
            if value is not None:
                self._data[key] = (value, now + checked)

    async def get(self, key: str) -> bytes | None:
        """The live value of ``key``, or None."""
        return self._live(key, self._clock())

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The live values of ``keys``, None where absent."""
        now = self._clock()
        return [self._live(key, now) for key in keys]

    async def keys(self, prefix: str) -> list[str]:
        """Every live key starting with ``prefix``."""
        now = self._clock()
        return [
            key for key in list(self._data)
            if key.startswith(prefix) and self._live(key, now) is not None
        ]

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove ``keys``."""
        for key in keys:
            self._data.pop(key, None)
