"""Which members of a worker group are live workers, not just keys in the bucket.

A lease is a key anyone with write access to the workers bucket can write.
Every worker therefore answers pings on ``names.worker_ping(group, id)``
from its own connection, and pings the other members every
``refresh_interval``. A member that has not answered for ``bound`` seconds
(counted from when its lease was first seen, so a new worker joins at
once) is left out of the assignment and its claims are ignored. For at
most ``bound`` seconds, then, a forged lease is a member like any other:
the share assigned to it (a full one) stalls, up to as many partitions
again move between the live workers (shares are balanced over every
member), and one announcing the older scheme switches the group to plain
rendezvous hashing; all of it is undone when the lease is dropped.

This is the liveness rule only. Bucket permissions (workers only may write
leases) are what keeps a client from writing leases in the first place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusError, nats_errors
from sessionbus.workers._cancel import cancel_and_wait

__all__ = ["Liveness"]

logger = logging.getLogger(__name__)


class Liveness:
    """Pings between the workers of one group, and what they showed."""

    def __init__(
        self, bus: SessionBus, *, group: str, worker_id: str, interval: float, bound: float,
        members: Callable[[], Iterable[str]], on_change: Callable[[], None],
    ) -> None:
        self._bus = bus
        self._group = group
        self._worker_id = worker_id
        self._interval = interval
        self._bound = bound
        self._members = members
        self._on_change = on_change
        self._first_seen: dict[str, float] = {}
        self._answered: dict[str, float] = {}
        self._dead: set[str] = set()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Answer pings on this worker's subject; start pinging the others."""
        nc = self._bus.nc
        with nats_errors("subscribing to worker pings"):
            self._sub = await nc.subscribe(
                self._bus.names.worker_ping(self._group, self._worker_id), cb=self._answer)
        self._task = asyncio.create_task(self._probe_loop(), name=f"pings:{self._worker_id}")

    async def stop(self) -> None:
        """Stop answering and pinging."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def seen(self, worker_id: str) -> None:
        """A lease of ``worker_id`` was seen: its grace starts now if it is new."""
        self._first_seen.setdefault(worker_id, asyncio.get_running_loop().time())

    def gone(self, worker_id: str) -> None:
        """Its lease was deleted or expired: forget it."""
        self._first_seen.pop(worker_id, None)
        self._answered.pop(worker_id, None)
        self._dead.discard(worker_id)

    def alive(self, worker_id: str) -> bool:
        """False once ``worker_id`` has not answered a ping for ``bound`` seconds."""
        return worker_id not in self._dead

    async def _answer(self, msg: Msg) -> None:
        if msg.reply:
            with contextlib.suppress(NatsError, OSError):
                await self._bus.nc.publish(msg.reply, b"")

    async def _ping(self, worker_id: str) -> None:
        subject = self._bus.names.worker_ping(self._group, worker_id)
        try:
            await self._bus.nc.request(subject, b"", timeout=min(1.0, self._interval))
        except (NatsError, OSError, TimeoutError, BusError):
            return
        self._answered[worker_id] = asyncio.get_running_loop().time()

    async def _probe_loop(self) -> None:
        while True:
            others = [w for w in self._members() if w != self._worker_id]
            if others and self._bus.nc.is_connected:
                await asyncio.gather(*(self._ping(w) for w in others))
                self._judge(others)
            await asyncio.sleep(self._interval)

    def _judge(self, others: list[str]) -> None:
        now = asyncio.get_running_loop().time()
        dead = {wid for wid in others
                if now - self._answered.get(wid, self._first_seen.get(wid, now)) >= self._bound}
        if dead != self._dead:
            for wid in sorted(dead - self._dead):
                logger.warning("worker %r of group %s does not answer pings; ignoring its "
                               "lease", wid, self._group)
            self._dead = dead
            self._on_change()
