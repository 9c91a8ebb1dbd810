"""Idle timers: one key per session whose per-key TTL runs out when it idles.

A session with an idle TTL has a timer key, ``names.session_timer_key(sid)``,
in the sessions bucket, written with a per-key TTL on open and refreshed on
activity (send, touch). When it runs out the server writes a marker and the
expiry watcher (:mod:`sessionbus.bus._expiry`) turns it into EXPIRED.

Refreshes are rate-limited per bus: the timer is written with ``ttl * 1.25``
(whole seconds, rounded up) and refreshed only once that slack is used up,
so a busy session writes its timer at most about once per ``ttl / 4`` while
a session never expires less than ``ttl`` after its last activity (and
normally within ``ttl * 1.25``, plus up to a second of rounding).

**The timer written at open is not acknowledged on its own.** It is
published right after the record's compare-and-set create, in the same
flush, so the open costs one acknowledged write rather than two. What makes
it as safe as an acknowledged write is the expiry watcher the opening bus
runs: it sees every timer write the bucket stores, and each timer sent this
way is *confirmed* when the watcher sees it. One not confirmed is written
again, acknowledged: at once when the watcher has seen a timer this bus
wrote after it (the stream stores one connection's writes in order, so it
was rejected or lost in a leader change), else after :data:`CONFIRM_WITHIN`
seconds, or :data:`LAG_LIMIT` times that while the watcher is behind (its
last delivery said more were pending), so a lagging watcher does not double
the writes it is already behind on. This path is only taken once an
acknowledged timer write has succeeded on this bus (the bucket takes per-key
TTLs) and while the watcher is subscribed; otherwise the open waits for both
acks.

A repair that fails (the stream has no leader, the server is restarting) is
tried again after a growing pause until it succeeds or the session ends
(:meth:`IdleTimers.forget`, or the watcher sees the timer deleted);
:data:`REPAIR_CONCURRENCY` repairs run at once and the rest wait their turn,
so a watcher that stalled does not start one write per session. A closing
bus gives the watcher a moment to confirm what it has not seen yet, then
writes the rest acknowledged, all within :data:`STOP_WITHIN` seconds: a
session opened just before the process exits still expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from sessionbus.bus._kv import KVEvent, KVOp
from sessionbus.bus.errors import BusError, nats_errors

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

__all__ = [
    "CONFIRM_WITHIN",
    "LAG_LIMIT",
    "REPAIR_CONCURRENCY",
    "STOP_WITHIN",
    "TIMER_SLACK",
    "IdleTimers",
    "timer_seconds",
]

logger = logging.getLogger(__name__)

#: The idle timer outlives the TTL by this fraction, which is what lets a
#: busy session skip refreshes.
TIMER_SLACK = 0.25
#: Sessions whose last timer write each bus remembers (for rate limiting).
TIMER_CACHE_SIZE = 100_000
#: Seconds a timer written without its ack may go unseen by the watcher
#: before it is written again, acknowledged.
CONFIRM_WITHIN = 2.0
#: How many times CONFIRM_WITHIN a timer waits for a watcher that confirms nothing.
LAG_LIMIT = 5
#: Timer repairs written at once; the others wait their turn.
REPAIR_CONCURRENCY = 16
#: Seconds a closing bus spends on the timers the watcher has not confirmed.
STOP_WITHIN = 3.0
#: The part of STOP_WITHIN spent waiting for the watcher before writing.
_STOP_CONFIRM_WAIT = 1.0
#: Pause before a failed repair is tried again: doubles from the first to the second.
_RETRY_MIN, _RETRY_MAX = 0.2, 5.0
_TTL = "Nats-TTL"


def timer_seconds(ttl: float) -> int:
    """The whole-second TTL an idle timer of ``ttl`` is written with."""
    return max(1, math.ceil(ttl * (1.0 + TIMER_SLACK)))


class IdleTimers:
    """One bus's idle-timer writes: refreshes, unacknowledged open writes and their repair."""

    def __init__(self, bus: SessionBus) -> None:
        self._bus = bus
        self._written: OrderedDict[str, float] = OrderedDict()
        #: Timer key -> (session id, ttl, when sent, number), in the order sent.
        self._unconfirmed: OrderedDict[str, tuple[str, float, float, int]] = OrderedDict()
        #: Timer key -> (session id, ttl): not seen in time, waiting to be written again.
        self._due: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: Timer key -> (session id, ttl): being written again (or waiting to retry).
        self._repairing: dict[str, tuple[str, float]] = {}
        self._sent = 0
        self._seen_through = 0  # the number of the latest timer the watcher saw
        self._behind = False  # the watcher's last delivery said more were pending
        self._sweep: asyncio.Handle | None = None
        self._repairs: set[asyncio.Task[None]] = set()
        self._all_seen: asyncio.Event | None = None  # set while a closing bus waits
        self._acked_once = False
        #: Seconds an unacknowledged timer may go unseen before it is written again.
        self.confirm_within = CONFIRM_WITHIN
        self.confirmed = 0
        """Timers written without their ack that the watcher saw."""
        self.repaired = 0
        """Timers written again because the watcher did not see them in time."""
        self.retried = 0
        """Repair writes that failed and were tried again."""
        self.withdrawn = 0
        """Timers not seen that the watcher saw deleted instead (the session ended)."""

    @property
    def unconfirmed(self) -> int:
        """Timers written without their ack and not seen by the watcher yet."""
        return len(self._unconfirmed)

    @property
    def repairing(self) -> int:
        """Timers not seen in time whose acknowledged write has not succeeded yet."""
        return len(self._due) + len(self._repairing)

    async def stop(self, *, watching: bool, within: float = STOP_WITHIN) -> None:
        """The bus is closing: make sure every timer it sent is stored, within ``within`` s.

        Called while the watcher still runs (``watching``): it gets a moment
        to confirm the timers it has not seen yet; those still unconfirmed,
        and those due for repair, are then written acknowledged, pipelined.
        """
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        deadline = time.monotonic() + within
        connected = self._bus.sessions_kv.nc.is_connected
        if watching and connected and self._unconfirmed:
            self._all_seen = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_seen.wait(), min(_STOP_CONFIRM_WAIT, within))
            self._all_seen = None
        for task in self._repairs:
            task.cancel()
        for task in list(self._repairs):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        rest = {key: (sid, ttl) for key, (sid, ttl, _, _) in self._unconfirmed.items()}
        rest.update(self._due)
        rest.update(self._repairing)
        self._unconfirmed.clear()
        self._due.clear()
        self._repairing.clear()
        if not rest:
            return
        if not connected:
            logger.error("%d sessions may not expire when idle: closing while disconnected"
                         " before their timers were confirmed", len(rest))
            return
        writes = [asyncio.ensure_future(self.refresh(sid, ttl, force=True))
                  for sid, ttl in rest.values()]
        done, pending = await asyncio.wait(writes, timeout=max(deadline - time.monotonic(), 0.1))
        for write in pending:
            write.cancel()
        failed = len(pending) + sum(1 for w in done if w.exception() is not None)
        if failed:
            logger.error("%d sessions may not expire when idle: their timer writes failed"
                         " while the bus closed", failed)

    def _claim(self, session_id: str, now: float) -> None:
        self._written[session_id] = now
        self._written.move_to_end(session_id)
        if len(self._written) > TIMER_CACHE_SIZE:
            self._written.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """The session ended: no refresh is due, nor any repair of its timer."""
        self._written.pop(session_id, None)
        self._withdraw(self._bus.names.session_timer_key(session_id))
        self._note_all_seen()

    def _withdraw(self, key: str) -> bool:
        """Stop confirming or repairing the timer ``key``; True if one was pending."""
        pending = self._unconfirmed.pop(key, None) is not None
        pending = self._due.pop(key, None) is not None or pending
        return self._repairing.pop(key, None) is not None or pending

    async def refresh(self, session_id: str, ttl: float, *, force: bool = False) -> bool:
        """Push back the idle timer, unless its slack still covers ``ttl``; True if written."""
        seconds = timer_seconds(ttl)
        now = time.monotonic()
        last = self._written.get(session_id)
        if not force and last is not None and now - last < seconds - ttl:
            return False
        # Claim the refresh before awaiting, so a burst of sends writes once.
        self._claim(session_id, now)
        try:
            with nats_errors(f"refreshing the timer of {session_id!r}"):
                await self._bus.sessions_kv.put(
                    self._bus.names.session_timer_key(session_id), b"", ttl=seconds
                )
        except BaseException:
            if self._written.get(session_id) == now:
                del self._written[session_id]
            raise
        self._acked_once = True
        return True

    def can_skip_ack(self, *, watching: bool) -> bool:
        """Whether an open may write its timer without waiting for its ack."""
        return self._acked_once and watching

    async def write_unacked(self, session_id: str, ttl: float) -> None:
        """Publish the timer without a reply; the watcher confirms it (see the module doc)."""
        key = self._bus.names.session_timer_key(session_id)
        now = time.monotonic()
        self._claim(session_id, now)
        self._sent += 1
        self._withdraw(key)  # this write replaces any repair still pending
        self._unconfirmed[key] = (session_id, ttl, now, self._sent)
        self._unconfirmed.move_to_end(key)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.confirm_within,
                                                                self._check)
        try:
            with nats_errors(f"writing the timer of {session_id!r}"):
                await self._publish(key, timer_seconds(ttl))
        except BaseException:
            self._unconfirmed.pop(key, None)
            raise

    async def _publish(self, key: str, seconds: int) -> None:
        await self._bus.nc.publish(self._bus.sessions_kv.subject(key), b"",
                                   headers={_TTL: str(seconds)})

    def seen(self, event: KVEvent) -> None:
        """The expiry watcher delivered ``event`` (a timer write, expiry or delete)."""
        self._behind = event.pending > 0
        if event.op in (KVOp.DELETE, KVOp.PURGE):
            # The session ended (closed here or elsewhere): no timer is wanted.
            if self._withdraw(event.key):
                self.withdrawn += 1
            self._note_all_seen()
            return
        if event.op is not KVOp.PUT:
            return
        entry = self._unconfirmed.pop(event.key, None)
        if entry is None:
            return
        self.confirmed += 1
        self._note_all_seen()
        if entry[3] > self._seen_through:
            self._seen_through = entry[3]
            oldest = next(iter(self._unconfirmed.values()), None)
            if oldest is not None and oldest[3] < entry[3]:
                # An earlier one was not seen before this one: it is lost.
                if self._sweep is not None:
                    self._sweep.cancel()
                self._sweep = asyncio.get_running_loop().call_soon(self._check)

    def _note_all_seen(self) -> None:
        if self._all_seen is not None and not self._unconfirmed:
            self._all_seen.set()

    def _check(self) -> None:
        """Write again, acknowledged, every timer the watcher has not seen in time."""
        self._sweep = None
        now = time.monotonic()
        while self._unconfirmed:
            key, (session_id, ttl, sent, number) = next(iter(self._unconfirmed.items()))
            waited = now - sent
            limit = self.confirm_within * (LAG_LIMIT if self._behind else 1)
            if number > self._seen_through and waited < limit:
                self._sweep = asyncio.get_running_loop().call_later(
                    max(limit - waited, 0.01), self._check)
                break
            del self._unconfirmed[key]
            self._due[key] = (session_id, ttl)
            self.repaired += 1
        loop = asyncio.get_running_loop()
        running = sum(1 for task in self._repairs if not task.done())
        for _ in range(min(REPAIR_CONCURRENCY - running, len(self._due))):
            task = loop.create_task(self._repair())
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)

    async def _repair(self) -> None:
        """Write the due timers, one at a time, each until it is stored or withdrawn."""
        pause = _RETRY_MIN
        while self._due:
            key, entry = self._due.popitem(last=False)
            self._repairing[key] = entry
            session_id, ttl = entry
            logger.debug("the timer of %r was not seen stored: writing it again", session_id)
            while self._repairing.get(key) is entry:
                try:
                    await self.refresh(session_id, ttl, force=True)
                except Exception as e:
                    self.retried += 1
                    logger.warning("writing the timer of %r failed (%s): trying again in"
                                   " %.1fs", session_id, e, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RETRY_MAX)
                    continue
                pause = _RETRY_MIN
                if self._repairing.get(key) is entry:
                    del self._repairing[key]

    async def drop(self, session_id: str) -> None:
        """Delete a closed session's idle timer without waiting for the ack.

        Housekeeping only: a timer that survives (lost write, lost server)
        expires later into a no-op, since the record is already terminal.
        The delete marker itself goes away after a minute.
        """
        kv = self._bus.sessions_kv
        headers = {"KV-Operation": "DEL", _TTL: "60"}
        try:
            with nats_errors(f"deleting the timer of {session_id!r}"):
                await self._bus.nc.publish(
                    kv.subject(self._bus.names.session_timer_key(session_id)), b"",
                    headers=headers,
                )
        except BusError as e:
            logger.warning("could not delete the idle timer of %r: %s", session_id, e)

    def __repr__(self) -> str:
        return (f"<IdleTimers written={len(self._written)} unconfirmed={len(self._unconfirmed)}"
                f" repairing={self.repairing} repaired={self.repaired}>")
