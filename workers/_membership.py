"""Worker leases in the ``workers`` KV bucket and who pulls which partition.

Each worker of a group keeps one key, ``names.worker_key(group, worker_id)``,
written with a per-key TTL and refreshed by compare-and-set. Its value is a
:class:`Lease`: the partitions the worker has *claimed* (is pulling, or is
still handing back) and whether it is draining. Every worker watches the
group's keys, so all of them see the same members and compute the same
assignment from them (see :mod:`sessionbus.workers._assignment`). Each
lease announces the newest assignment scheme its worker runs, and the
group runs the oldest announced: while a worker of an older version is
live (or, after a rejoin, may still come back), every worker splits the
partitions by plain rendezvous hashing; once the last one drains or is
gone, all switch to the balanced split at once, which moves many
partitions that one time.

Assignment says who *should* pull a partition; claims say who still does.
A worker starts pulling a partition it is assigned only once no other live
lease claims it, and a worker giving one up keeps its claim until it has
finished its turns and handed the rest back (see :mod:`sessionbus.workers._partition`).
A dead worker's claims vanish with its lease when the TTL runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from sessionbus.bus._kv import KVOp, wire_ttl
from sessionbus.bus._names import decode_token
from sessionbus.bus._retry import Unanswered
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusError, BusTimeout, KeyConflict, WorkerError
from sessionbus.schemas import decode_map, encode
from sessionbus.schemas.errors import DecodeError
from sessionbus.workers._assignment import AssignmentScheme, group_scheme, share_while_held_back
from sessionbus.workers._cancel import cancel_and_wait
from sessionbus.workers._liveness import Liveness
from sessionbus.workers.config import WorkerConfig

__all__ = ["Lease", "Membership"]

logger = logging.getLogger(__name__)

#: Seconds past a lease's own ``expires_at`` before another process of the
#: same worker id may take the key over (clock skew between hosts).
_TAKEOVER_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class Lease:
    """What one worker publishes about itself in its lease key."""

    worker_id: str
    node_id: str = ""
    claims: frozenset[int] = frozenset()
    draining: bool = False
    started_at: float = 0.0
    #: Wall-clock time the lease runs out unless refreshed (informational).
    expires_at: float = 0.0
    #: The newest assignment scheme this worker runs (on the wire as
    #: ``assignment``; absent from older versions' leases: RENDEZVOUS).
    scheme: AssignmentScheme = AssignmentScheme.BALANCED

    def encode(self) -> bytes:
        """Wire form (the schemas msgpack codec)."""
        return encode({
            "worker_id": self.worker_id, "node_id": self.node_id,
            "claims": sorted(self.claims), "draining": self.draining,
            "started_at": self.started_at, "expires_at": self.expires_at,
            "assignment": int(self.scheme),
        })

    @classmethod
    def decode(cls, raw: bytes) -> Lease:
        """Parse a lease value; raises DecodeError if it is not one."""
        body = decode_map(raw)
        try:
            return cls(
                worker_id=str(body["worker_id"]), node_id=str(body.get("node_id", "")),
                claims=frozenset(int(p) for p in body.get("claims", ())),
                draining=bool(body.get("draining", False)),
                started_at=float(body.get("started_at", 0.0)),
                expires_at=float(body.get("expires_at", 0.0)),
                scheme=AssignmentScheme.from_wire(
                    int(body.get("assignment", AssignmentScheme.RENDEZVOUS))),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # int(inf) overflows
            raise DecodeError(f"invalid lease: {e}", raw) from e


@dataclass(slots=True)
class Member:
    """Another worker as this one sees it through the watch."""

    lease: Lease
    revision: int
    #: Loop time the lease was last seen written; a backstop if an expiry is missed.
    seen: float = field(default=0.0)


class Membership:
    """This worker's lease and its view of the group.

    ``changed`` is set whenever the view or the own lease changes; ``lost``
    is set if the lease ran out or was taken over (the worker must stop
    pulling everything at once and :meth:`rejoin`).
    """

    def __init__(
        self, bus: SessionBus, *, group: str, worker_id: str, config: WorkerConfig
    ) -> None:
        self._bus = bus
        self._kv = bus.workers_kv
        self.group = group
        self.worker_id = worker_id
        self._config = config
        self._key = bus.names.worker_key(group, worker_id)
        self._filter = bus.names.worker_group_filter(group)
        self._lease = Lease(worker_id=worker_id, node_id=bus.node_id)
        self._revision = 0
        # Loop time of the last rejoin, and when other members vanished.
        self._rejoined_at: float | None = None
        # Loop time each vanished member was last seen, and its scheme.
        self._gone: dict[str, tuple[float, AssignmentScheme]] = {}
        self._share: tuple[tuple[object, ...], frozenset[int]] | None = None
        # started_at of the lease this object last created: tells its own
        # lease from another process's (or another Worker's) of the same id.
        self._created_at: float | None = None
        self._members: dict[str, Member] = {}
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()
        self.lost = asyncio.Event()
        # A member whose lease was not seen written for this long is taken as
        # gone even if its expiry marker never reached this watcher.
        self._stale_after = 2.0 * wire_ttl(config.lease_ttl) + 1.0
        # A member that does not answer pings from a live connection for as
        # long is ignored: a lease anyone wrote is not a worker.
        self._liveness = Liveness(
            bus, group=group, worker_id=worker_id, interval=config.refresh_interval,
            bound=self._stale_after, members=lambda: list(self._members),
            on_change=self.changed.set,
        )

    # -- lifecycle ----------------------------------------------------------

    @property
    def lease(self) -> Lease:
        """The lease as last written."""
        return self._lease

    async def join(self) -> None:
        """Create the lease, load the group's leases, then follow changes."""
        await self._create()
        loop = asyncio.get_running_loop()
        for entry in await self._kv.list(self._filter):
            self._apply_put(entry.key, entry.value, entry.revision, loop.time())
        await self._liveness.start()
        self._tasks = [
            asyncio.create_task(self._watch(), name=f"lease-watch:{self.worker_id}"),
            asyncio.create_task(self._refresh_loop(), name=f"lease-refresh:{self.worker_id}"),
        ]
        self.changed.set()

    async def rejoin(self) -> None:
        """Create a fresh lease (no claims) after :attr:`lost` was set."""
        async with self._write_lock:
            self._lease = Lease(worker_id=self.worker_id, node_id=self._bus.node_id)
        await self._create()
        loop = asyncio.get_running_loop()
        self._rejoined_at = loop.time()
        horizon = self._rejoined_at - 2 * self.rejoin_grace
        self._gone = {wid: gone for wid, gone in self._gone.items() if gone[0] >= horizon}
        self.lost.clear()
        self.changed.set()
        # Take the held-back shares once the grace is over, if nobody came back.
        loop.call_later(self.rejoin_grace, self.changed.set)

    async def leave(self) -> None:
        """Stop refreshing and delete the lease, releasing every claim at once."""
        await self.close()
        with contextlib.suppress(BusError, OSError):
            await self._kv.delete(self._key, resend_unanswered=False)

    async def close(self) -> None:
        """Stop the background tasks without touching the lease (it expires)."""
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)
        await self._liveness.stop()

    # -- own lease ----------------------------------------------------------

    async def _create(self) -> None:
        async with self._write_lock:
            self._revision = await self._claim_key()

    async def _claim_key(self) -> int:
        """Write a fresh lease under this worker's key; return its revision.

        The key may still hold a lease of this worker id: this process's own
        (its write was lost, e.g. by a server restart), taken over at once;
        or a dead predecessor's (the same id restarted), taken over once
        that lease ran out (its ``expires_at``, even if the server's TTL
        marker never comes). A lease that is refreshed meanwhile belongs to
        a live process: two processes with one id is an error.

        A write nobody answered (a stream leader paused or electing) may
        have been stored: it is sent again, up to ``UNANSWERED_WRITES``
        times in all, and a lease any of these attempts wrote is this
        process's own.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wire_ttl(self._config.lease_ttl) + _TAKEOVER_GRACE + 1.0
        seen: int | None = None
        mine = {self._created_at}
        unanswered = Unanswered(f"worker {self.worker_id}: a write of its lease")
        while True:
            now = time.time()
            self._lease = dataclasses.replace(self._lease, started_at=now,
                                              expires_at=now + self._config.lease_ttl)
            self._created_at = now
            mine.add(now)
            raw = self._lease.encode()
            try:
                return await self._kv.create(self._key, raw, ttl=self._config.lease_ttl,
                                             resend_unanswered=False)
            except KeyConflict:
                pass
            except BusTimeout as e:
                unanswered.again(e)
                continue
            entry = await self._kv.get(self._key)
            if entry is None:
                continue  # gone in between: create again
            try:
                old = Lease.decode(entry.value)
            except DecodeError:
                old = Lease(worker_id=self.worker_id)
            own = old.node_id == self._bus.node_id and old.started_at in mine
            if seen is not None and entry.revision != seen and not own:
                raise WorkerError(
                    f"worker id {self.worker_id!r} already has a live lease in group "
                    f"{self.group!r}; give each worker process its own id"
                )
            seen = entry.revision
            if own or time.time() > old.expires_at + _TAKEOVER_GRACE:
                try:
                    return await self._kv.update(self._key, raw, last=entry.revision,
                                                 ttl=self._config.lease_ttl,
                                                 resend_unanswered=False)
                except KeyConflict:
                    continue
                except BusTimeout as e:
                    unanswered.again(e)
                    continue
            if loop.time() > deadline:
                raise WorkerError(
                    f"worker id {self.worker_id!r} already has a live lease in group "
                    f"{self.group!r}; give each worker process its own id"
                )
            await asyncio.sleep(min(0.25, self._config.refresh_interval / 4))

    async def update(
        self, *, claims: Iterable[int] | None = None, draining: bool | None = None
    ) -> None:
        """Rewrite the lease (claims, draining) by compare-and-set, renewing its TTL.

        Raises WorkerError and sets :attr:`lost` if the lease is gone.
        """
        async with self._write_lock:
            lease = self._lease
            if claims is not None:
                lease = dataclasses.replace(lease, claims=frozenset(claims))
            if draining is not None:
                lease = dataclasses.replace(lease, draining=draining)
            await self._write(lease)
        self.changed.set()

    async def _write(self, lease: Lease) -> None:
        lease = dataclasses.replace(lease, expires_at=time.time() + self._config.lease_ttl)
        try:
            self._revision = await self._kv.update(
                self._key, lease.encode(), last=self._revision, ttl=self._config.lease_ttl,
                resend_unanswered=False,
            )
        except KeyConflict as e:
            self.lost.set()
            self.changed.set()
            raise WorkerError(f"lease of worker {self.worker_id!r} expired or was replaced") from e
        self._lease = lease

    async def _refresh_loop(self) -> None:
        interval = self._config.refresh_interval
        while True:
            await asyncio.sleep(interval)
            if self.lost.is_set():
                continue
            try:
                async with self._write_lock:
                    await self._write(self._lease)
            except WorkerError:
                logger.warning("worker %s lost its lease in group %s", self.worker_id, self.group)
            except (BusError, OSError) as e:
                # A timeout is not a loss: the next refresh may still land in time.
                logger.warning("lease refresh of %s failed: %s", self.worker_id, e)
            except Exception as e:
                # Whatever the client raises, the refresh loop must outlive it:
                # a dead refresh loop is a worker that never rejoins.
                logger.warning("lease refresh of %s failed: %r", self.worker_id, e)

    # -- the group ----------------------------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async for event in self._kv.watch(self._filter, include_existing=True):
                    if event.op is KVOp.PUT:
                        self._apply_put(event.key, event.value, event.revision, loop.time())
                    else:
                        self._apply_gone(event.key, event.revision)
            except asyncio.CancelledError:
                raise
            except (BusError, NatsError, OSError) as e:
                # The server's or the connection's (a stream electing a leader
                # answers 503): nothing to debug here, the watch starts again.
                logger.warning("lease watch of group %s failed: %r; restarting", self.group, e)
                await asyncio.sleep(0.5)
            except Exception:
                logger.exception("lease watch of group %s failed; restarting", self.group)
                await asyncio.sleep(0.5)

    def _apply_put(self, key: str, raw: bytes, revision: int, now: float) -> None:
        try:
            lease = Lease.decode(raw)
        except DecodeError:
            logger.warning("ignoring malformed lease %r in group %s", key, self.group)
            return
        try:
            expected = self._bus.names.worker_key(self.group, lease.worker_id)
        except BusError:
            expected = None
        if key != expected:
            logger.warning("ignoring lease %r in group %s: it names worker %r", key,
                           self.group, lease.worker_id)
            return
        self._liveness.seen(lease.worker_id)
        current = self._members.get(lease.worker_id)
        if current is not None and current.revision >= revision:
            return
        self._members[lease.worker_id] = Member(lease=lease, revision=revision, seen=now)
        self.changed.set()

    def _apply_gone(self, key: str, revision: int) -> None:
        try:
            worker_id = decode_token(key.rsplit(".", 1)[-1], "worker id")
        except BusError:
            return
        current = self._members.get(worker_id)
        if current is not None and current.revision < revision:
            del self._members[worker_id]
            self._liveness.gone(worker_id)
            if not current.lease.draining:
                self._gone[worker_id] = (asyncio.get_running_loop().time(),
                                         current.lease.scheme)
            self.changed.set()

    def members(self) -> dict[str, Lease]:
        """Live members' leases by worker id, this worker's own always included."""
        now = asyncio.get_running_loop().time()
        out = {
            wid: m.lease for wid, m in self._members.items()
            if wid != self.worker_id and now - m.seen < self._stale_after
            and self._liveness.alive(wid)
        }
        if not self.lost.is_set():
            out[self.worker_id] = self._lease
        return out

    def assigned(self, partitions: int) -> set[int]:
        """Partitions this worker should pull, given the live non-draining members.

        Right after this worker rejoined (its lease was lost, most often to
        a server restart that cost every lease), members that vanished
        shortly before are held back for :attr:`rejoin_grace` seconds:
        they are probably rejoining too, and taking their partitions now
        would move every session to a worker that never saw it (its
        completed envelopes, whose acks the restart may have lost, would
        run again there). Meanwhile this worker takes only what is its own
        with them and without them, so nothing it takes moves again.
        """
        leases = {wid: lease for wid, lease in self.members().items() if not lease.draining}
        if self.worker_id not in leases:
            return set()
        schemes = [lease.scheme for lease in leases.values()]
        held_back: frozenset[str] = frozenset()
        now = asyncio.get_running_loop().time()
        if self._rejoined_at is not None and now - self._rejoined_at < self.rejoin_grace:
            since = self._rejoined_at - self.rejoin_grace
            gone = {wid: scheme for wid, (at, scheme) in self._gone.items()
                    if at >= since and wid not in leases}
            held_back = frozenset(gone)
            schemes += gone.values()
        scheme = group_scheme(schemes)
        key = (partitions, frozenset(leases), held_back, scheme)
        if self._share is None or self._share[0] != key:
            # Every lease refresh of every member asks again: compute once per view.
            share = share_while_held_back(partitions, self.worker_id, leases, held_back,
                                          scheme=scheme)
            self._share = (key, frozenset(share))
        return set(self._share[1])

    @property
    def rejoin_grace(self) -> float:
        """Seconds after a rejoin during which recently vanished members keep their share."""
        return wire_ttl(self._config.lease_ttl) + 1.0

    def claimed_elsewhere(self) -> set[int]:
        """Partitions some other live member still claims."""
        out: set[int] = set()
        for wid, lease in self.members().items():
            if wid != self.worker_id:
                out |= lease.claims
        return out

