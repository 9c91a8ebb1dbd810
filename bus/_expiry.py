"""The expiry watcher: turns idle-timer TTL markers into EXPIRED sessions.

Each session with a TTL has a timer key in the sessions bucket whose
per-key TTL is pushed back on activity (see :mod:`sessionbus.bus._lifecycle`). When it
runs out, the server replaces it with a marker (``Nats-Marker-Reason:
MaxAge``); this watcher sees the marker as :attr:`~sessionbus.bus._kv.KVOp.EXPIRED` and
asks the lifecycle to expire the session. Many buses may run a watcher at
once: the compare-and-set on the record lets exactly one of them win, and
only the winner broadcasts. The timer writes it sees confirm the ones this
bus sent without waiting for their ack (see :mod:`sessionbus.bus._timers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sessionbus.bus._kv import KVEvent, KVOp
from sessionbus.bus._names import Names
from sessionbus.bus.errors import SessionNotFound

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

__all__ = ["ExpiryWatcher"]

logger = logging.getLogger(__name__)

#: Expiries handled at once; each is a couple of KV round trips.
CONCURRENCY = 32
_RESTART_MIN, _RESTART_MAX = 0.1, 5.0


class ExpiryWatcher:
    """A watch on every session's idle timer; ``expire(session_id)`` runs per marker.

    Runs until :meth:`stop`; if the watch fails (lost connection, stream
    leader change) it is re-created after a growing pause.
    """

    def __init__(
        self, *, bus: SessionBus, expire: Callable[[str], Awaitable[bool]],
        seen: Callable[[KVEvent], None] | None = None, concurrency: int = CONCURRENCY,
    ) -> None:
        self._bus = bus
        self._expire = expire
        self._seen = seen
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        #: Timer markers handled, and how many of them this watcher expired.
        self.handled = 0
        self.expired = 0

    async def start(self) -> None:
        """Start watching; returns once the watch is subscribed."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="sessionbus-expiry-watcher")
        ready = asyncio.create_task(self._ready.wait())
        # Also return if the first attempt fails, rather than hang: the loop retries.
        await asyncio.wait({ready, self._task}, timeout=self._bus.settings.request_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()

    async def stop(self) -> None:
        """Stop watching and cancel expiries in flight (the next watcher redoes them)."""
        task, self._task = self._task, None
        tasks = [t for t in (task, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._running.clear()

    async def _run(self) -> None:
        pause = _RESTART_MIN
        names = self._bus.names
        while True:
            try:
                async for event in self._bus.sessions_kv.watch(
                    names.session_timer_filter, meta_only=True, ready=self._ready
                ):
                    pause = _RESTART_MIN
                    if event.op is KVOp.EXPIRED:
                        await self._slots.acquire()
                        task = asyncio.create_task(self._handle(event.key))
                        self._running.add(task)
                        task.add_done_callback(self._done)
                    if self._seen is not None:
                        self._seen(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._ready.clear()
                logger.warning("expiry watcher failed (%s), restarting in %.1fs", e, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RESTART_MAX)

    @property
    def ready(self) -> bool:
        """Whether the watch is subscribed now (every timer write from here on is seen)."""
        return self._ready.is_set() and self._task is not None

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _handle(self, key: str) -> None:
        try:
            session_id = Names.session_of_key(key)
            if await self._expire(session_id):
                self.expired += 1
                logger.debug("session %r expired", session_id)
        except SessionNotFound:
            pass  # removed before its timer ran out
        except Exception:
            logger.exception("could not expire the session of timer %r", key)
        finally:
            self.handled += 1
