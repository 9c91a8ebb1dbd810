"""The writing side of a registry: this node's records and their compare-and-set heartbeats.

:class:`RecordWriter` remembers the last record it wrote for each session
and that write's revision, so a heartbeat is normally one compare-and-set
write with no read before it. When the write loses (someone else wrote or
removed the record, or it expired and the server placed a marker), the
writer reads the key's head and decides:

* a removal (delete marker or tombstone): do nothing, the removal stands;
* a live record: write over it at its revision;
* an expired record (a marker, nothing at all, or a value whose
  ``expires_at`` has passed): write it again from what is known of it, or
  raise :class:`~sessionbus.bus.errors.SessionExpired` if told not to re-create.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from sessionbus.bus._registry_backends import HeadState, RegistryBackend
from sessionbus.bus._registry_record import Metrics, decode_record, is_alive
from sessionbus.bus.errors import ConcurrentUpdate, CorruptRecord, KeyConflict, SessionExpired
from sessionbus.schemas.codec import encode

logger = logging.getLogger(__name__)

#: Compare-and-set attempts of one heartbeat before ConcurrentUpdate.
MAX_ATTEMPTS = 8


class Written:
    """The last record this node wrote for a session, and its revision."""

    __slots__ = ("body", "call_id", "revision", "session_id", "touched")

    def __init__(self, call_id: str, session_id: str, body: dict[str, Any], revision: int
                 ) -> None:
        self.call_id = call_id
        self.session_id = session_id
        self.body = body
        self.revision = revision
        self.touched = time.monotonic()


class RecordWriter:
    """Registers and heartbeats one node's session records.

    ``forget_after`` bounds memory: a session not written for that long
    (its host stopped heartbeating it) is forgotten.
    """

    def __init__(
        self, *, node_id: str, ttl: float, recreate_expired: bool, forget_after: float
    ) -> None:
        self.node_id = node_id
        self.ttl = ttl
        self.recreate_expired = recreate_expired
        self.forget_after = forget_after
        self.written: dict[str, Written] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_prune = time.monotonic()

    def sessions(self) -> list[tuple[str, str, str]]:
        """``(key, call_id, session_id)`` of every session this node wrote."""
        return [(k, w.call_id, w.session_id) for k, w in self.written.items()]

    def forget(self, key: str) -> None:
        """Drop what is known of ``key`` (it was removed)."""
        self.written.pop(key, None)

    async def register(
        self, storage: RegistryBackend, key: str, call_id: str, session_id: str
    ) -> None:
        """Write a fresh record unconditionally."""
        now = time.time()
        body: dict[str, Any] = {
            "session_id": session_id, "call_id": call_id, "node_id": self.node_id,
            "started_at": now, "metrics_updated_at": now, "metrics": {},
            "expires_at": now + self.ttl,
        }
        revision = await storage.put(key, encode(body), self.ttl)
        self._remember(key, Written(call_id, session_id, body, revision))

    async def heartbeat(
        self, storage: RegistryBackend, key: str, call_id: str, session_id: str,
        metrics: Metrics | None, *, metrics_type: str | None = None,
    ) -> None:
        """Restart the record's TTL, replacing its metrics if given (see the module).

        ``metrics_type`` names the class the metrics were given as (None: a dict).
        """
        # One heartbeat per key at a time in this process: concurrent ones
        # would only make each other's compare-and-set fail.
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        try:
            async with lock:
                await self._heartbeat(storage, key, call_id, session_id, metrics, metrics_type)
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]

    async def _heartbeat(
        self, storage: RegistryBackend, key: str, call_id: str, session_id: str,
        metrics: Metrics | None, metrics_type: str | None = None,
    ) -> None:
        written = self.written.get(key)
        base = written.body if written is not None else None
        last = written.revision if written is not None else None
        for attempt in range(MAX_ATTEMPTS):
            now = time.time()
            if last is None:
                head = await storage.head(key)
                if head.state is HeadState.REMOVED:
                    self.forget(key)
                    logger.debug("not refreshing %r: it was removed", key)
                    return
                last = head.revision
                expired = True
                if head.state is HeadState.LIVE:
                    try:
                        _, base = decode_record(key, head.value)
                        expired = not is_alive(base, now)
                    except CorruptRecord as e:
                        logger.warning("overwriting registry record %r: %s", key, e)
            else:
                assert base is not None
                expired = not is_alive(base, now)
            if expired:
                if not self.recreate_expired:
                    self.forget(key)
                    raise SessionExpired(session_id, call_id)
                logger.info("registry record of session %r (call %r) had expired: "
                            "writing it again", session_id, call_id)
            body = self._next_body(call_id, session_id, base, now, metrics, metrics_type)
            try:
                revision = await storage.write(key, encode(body), self.ttl, last=last)
            except KeyConflict:
                last = None  # another node wrote or removed it: look again
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                continue
            self._remember(key, Written(call_id, session_id, body, revision))
            return
        raise ConcurrentUpdate(session_id, MAX_ATTEMPTS)

    def _next_body(
        self, call_id: str, session_id: str, base: dict[str, Any] | None, now: float,
        metrics: Metrics | None, metrics_type: str | None = None,
    ) -> dict[str, Any]:
        # Fields this code does not know (written by a newer version) are kept.
        body: dict[str, Any] = dict(base) if base is not None else {
            "node_id": self.node_id, "started_at": now, "metrics_updated_at": now,
            "metrics": {},
        }
        body["session_id"] = session_id
        body["call_id"] = call_id
        if metrics is not None:
            body["metrics"] = metrics
            body["metrics_updated_at"] = now
            if metrics_type is None:
                body.pop("metrics_type", None)
            else:
                body["metrics_type"] = metrics_type
        body["expires_at"] = now + self.ttl
        return body

    def _remember(self, key: str, written: Written) -> None:
        self.written[key] = written
        now = time.monotonic()
        if now - self._last_prune < self.ttl:
            return
        self._last_prune = now
        horizon = now - self.forget_after
        for stale in [k for k, w in self.written.items() if w.touched < horizon]:
            del self.written[stale]
