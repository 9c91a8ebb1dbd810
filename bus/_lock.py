"""A session's turn lock, held across processes and machines.

The lock is a lease: one key per session in the locks bucket, created only
if absent, with a per-key TTL of ``lock_lease`` seconds. While held, a
background task rewrites it every ``lock_refresh`` seconds as a
compare-and-set on the revision it last wrote, which also renews the TTL.
So:

* a holder that dies (even by SIGKILL) stops refreshing, and the server
  removes the key about ``lock_lease`` seconds later;
* a refresh that finds another revision means someone else wrote the key:
  the lock was lost, :attr:`TurnLock.lost` is set and :meth:`TurnLock.release`
  raises :class:`~sessionbus.bus.errors.LockLost`;
* a holder that cannot reach the server gives the lock up locally when its
  lease runs out, before the server can hand it to anyone else (the
  server's TTL is counted from a later instant and rounded up);
* release is a compare-and-set delete, so it never removes another
  holder's lease.

Waiters watch the key and retry when it is deleted, purged or expires, with
a bounded poll as a fallback, so a released lock is taken within a round
trip or two instead of a poll period.

Every acquisition gets a *fencing token*: the revision of the write that
created the lease. Revisions only grow, so a later holder always has a
larger token, and a writer can compare its token with :func:`read_lock`
to find out that it is a stale holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

import nats.errors
from sessionbus.bus._kv import Bucket, KVOp
from sessionbus.bus.errors import (
    BusError,
    ConfigError,
    DecodeError,
    KeyConflict,
    LockError,
    LockLost,
    LockTimeout,
)
from sessionbus.bus.settings import check_lock_timing
from sessionbus.schemas.codec import decode_map, encode

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

__all__ = ["LockState", "TurnLock", "read_lock"]

logger = logging.getLogger(__name__)

#: How long a released lock's delete marker stays. While it does, the next
#: acquisition by the same :class:`TurnLock` is one write instead of three.
_RELEASED_MARKER_TTL = 60.0
#: Longest a waiter sleeps between attempts when no watch event wakes it.
_MAX_POLL = 1.0


@dataclass(frozen=True, slots=True)
class LockState:
    """A turn lock as stored in its lease key.

    ``token`` is the fencing token of the holder, ``expires_at`` the wall
    clock time its lease runs out unless refreshed, ``revision`` the key's
    current revision (it changes with every refresh; the token does not).
    """

    session_id: str
    owner: str
    token: int
    expires_at: float
    revision: int


async def read_lock(bus: SessionBus, session_id: str) -> LockState | None:
    """Who holds ``session_id``'s turn lock, from any process; None if nobody."""
    entry = await bus.locks_kv.get(bus.names.lock_key(session_id))
    if entry is None:
        return None
    return _parse_state(session_id, entry.value, entry.revision)


def _parse_state(session_id: str, raw: bytes, revision: int) -> LockState:
    try:
        body = decode_map(raw)
        owner = str(body.get("owner", ""))
        # The creating write cannot know its own revision: token 0 in the
        # value means "the revision of this write", filled in by refreshes.
        token = int(body.get("token") or revision)
        expires_at = float(body.get("expires_at", 0.0))
    except (DecodeError, TypeError, ValueError):
        logger.warning("unreadable lock lease for %r at revision %d", session_id, revision)
        return LockState(session_id, "", revision, 0.0, revision)
    return LockState(session_id, owner, token, expires_at, revision)


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise ConfigError(f"timeout must be None or a number >= 0, got {timeout!r}")
    return float(timeout)


class TurnLock:
    """The cluster-wide turn lock of one session.

    ``async with TurnLock(bus, "s1"):`` runs the block while no other
    process anywhere holds the same session's lock. ``lease`` and
    ``refresh`` default to the bus settings ``lock_lease`` and
    ``lock_refresh``. A ``TurnLock`` may be acquired again after release,
    but is not reentrant, and one object is meant for one task at a time.
    Waiters are not served in order.
    """

    def __init__(
        self,
        bus: SessionBus,
        session_id: str,
        *,
        lease: float | None = None,
        refresh: float | None = None,
        owner: str | None = None,
    ) -> None:
        settings = bus.settings
        if lease is None:
            lease = settings.lock_lease
            refresh = settings.lock_refresh if refresh is None else refresh
        self.lease, self.refresh = check_lock_timing(lease, refresh)
        self.bus = bus
        self.session_id = session_id
        self.key = bus.names.lock_key(session_id)
        self.owner = owner or f"{bus.node_id}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        #: Set when a held lock is found lost (taken over, or the lease ran
        #: out while the server could not be reached).
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._token = 0
        self._revision = 0
        self._deadline = 0.0  # loop time the local view of the lease ends
        self._held = False
        self._refresher: asyncio.Task[None] | None = None
        self._hint: int | None = None  # revision of our last release marker

    # -- state ---------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this object holds the lock and has not found it lost."""
        return self._held and not self.lost.is_set()

    @property
    def token(self) -> int:
        """The fencing token of the current (or last) acquisition; 0 before any."""
        return self._token

    @property
    def _kv(self) -> Bucket:
        return self.bus.locks_kv

    # -- acquire -------------------------------------------------------------

    # A timeout argument, not asyncio.timeout(): running out raises LockTimeout,
    # and the attempt in flight is never cut off halfway through a write.
    async def acquire(self, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Wait for the lock (at most ``timeout`` seconds) and return the fencing token.

        Raises :class:`~sessionbus.bus.errors.LockTimeout` when the time runs out.
        """
        limit = _check_timeout(timeout)
        if self._held:
            raise LockError(self.session_id, f"turn lock of {self.session_id!r} is already held")
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        if await self._attempt():
            return self._token
        if limit == 0:
            raise LockTimeout(self.session_id, f"turn lock of {self.session_id!r} is held")
        waker = _Waker(self._kv, self.key)
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise LockTimeout(
                        self.session_id,
                        f"turn lock of {self.session_id!r} not obtained in {limit} s",
                    )
                poll = min(self.refresh, _MAX_POLL)
                await waker.wait(poll if remaining is None else min(poll, remaining))
                if await self._attempt():
                    return self._token
        finally:
            await waker.close()

    async def try_acquire(self) -> bool:
        """Take the lock only if it is free right now."""
        try:
            await self.acquire(timeout=0)
        except LockTimeout:
            return False
        return True

    async def _attempt(self) -> bool:
        """One try at creating the lease; True if it is now ours."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        value = self._value(token=0)
        try:
            revision = await self._create(value)
        except KeyConflict:
            return False
        except (BusError, nats.errors.Error) as e:
            # The write may have landed without our hearing back: if the
            # lease carries our owner id, it is ours.
            logger.debug("turn lock write for %r failed: %s", self.session_id, e)
            state = await self._read_quietly()
            if state is None or state.owner != self.owner:
                return False
            revision = state.revision
        self._token = revision
        self._revision = revision
        self._deadline = sent + self.lease
        self._held = True
        self.lost.clear()
        self.lost_reason = ""
        self._refresher = asyncio.create_task(
            self._keep(), name=f"turn-lock-refresh:{self.session_id}"
        )
        return True

    async def _create(self, value: bytes) -> int:
        # Not sent again when no stream takes it: acquire() has its own
        # deadline and polls, and try_acquire() answers at once.
        hint, self._hint = self._hint, None
        if hint is not None:
            with contextlib.suppress(KeyConflict):
                return await self._kv.update(self.key, value, last=hint, ttl=self.lease,
                                             resend_within=0, resend_unanswered=False)
        return await self._kv.create(self.key, value, ttl=self.lease, resend_within=0,
                                     resend_unanswered=False)

    async def _read_quietly(self) -> LockState | None:
        try:
            return await read_lock(self.bus, self.session_id)
        except (BusError, nats.errors.Error):
            return None

    def _value(self, *, token: int) -> bytes:
        return encode({
            "owner": self.owner,
            "token": token,
            "expires_at": time.time() + self.lease,
            "lease": self.lease,
        })

    # -- hold ----------------------------------------------------------------

    async def _keep(self) -> None:
        """Refresh the lease until cancelled, or until it is found lost."""
        loop = asyncio.get_running_loop()
        while True:
            left = self._deadline - loop.time()
            await asyncio.sleep(max(0.0, min(self.refresh, left)))
            left = self._deadline - loop.time()
            if left <= 0:
                self._mark_lost("the lease ran out before it could be refreshed")
                return
            sent = loop.time()
            try:
                async with asyncio.timeout(left):
                    revision = await self._kv.update(
                        self.key, self._value(token=self._token), last=self._revision,
                        ttl=self.lease, resend_unanswered=False,
                    )
            except KeyConflict:
                self._mark_lost("the lease was rewritten by another owner")
                return
            except (BusError, nats.errors.Error, TimeoutError) as e:
                logger.warning("refreshing turn lock of %r failed: %s", self.session_id, e)
                continue
            self._revision = revision
            self._deadline = sent + self.lease

    def _mark_lost(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        logger.warning("turn lock of %r lost: %s", self.session_id, reason)

    async def check(self) -> int:
        """Confirm with the server that the lock is still ours; return the token.

        Raises :class:`~sessionbus.bus.errors.LockLost` if another owner holds it, or
        nobody does. Call it before a write that must not come from a stale
        holder.
        """
        if not self._held:
            raise LockError(self.session_id, f"turn lock of {self.session_id!r} is not held")
        if self.lost.is_set():
            raise LockLost(self.session_id, self._lost_message())
        state = await read_lock(self.bus, self.session_id)
        if state is None or state.owner != self.owner or state.token != self._token:
            self._mark_lost("the lease now belongs to another owner" if state else
                            "the lease is gone")
            raise LockLost(self.session_id, self._lost_message())
        return self._token

    def _lost_message(self) -> str:
        return f"turn lock of {self.session_id!r} was lost: {self.lost_reason}"

    # -- release -------------------------------------------------------------

    async def release(self) -> None:
        """Give the lock back.

        Raises :class:`~sessionbus.bus.errors.LockLost` if it was lost while held (the
        work done under it may have overlapped another holder's).
        """
        if not self._held:
            raise LockError(self.session_id, f"turn lock of {self.session_id!r} is not held")
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        self._held = False
        if self.lost.is_set():
            raise LockLost(self.session_id, self._lost_message())
        try:
            self._hint = await self._kv.delete(
                self.key, last=self._revision, ttl=_RELEASED_MARKER_TTL,
                resend_unanswered=False,
            )
        except KeyConflict as e:
            self._mark_lost("the lease was rewritten by another owner")
            raise LockLost(self.session_id, self._lost_message()) from e
        except (BusError, nats.errors.Error) as e:
            # The lease runs out on its own; the work under it was not at risk.
            logger.warning(
                "releasing turn lock of %r failed (%s); it frees in %.1f s",
                self.session_id, e, self.lease,
            )

    async def __aenter__(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.release()
            return
        # Do not hide what the block raised behind a lost lock.
        try:
            await self.release()
        except LockLost as lost:
            logger.warning("%s (while the turn raised %r)", lost, exc)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "held" if self._held else "free"
        return f"<TurnLock {self.session_id!r} {state} token={self._token}>"


class _Waker:
    """Wakes a waiter when a lock key is deleted, purged or expires."""

    def __init__(self, bucket: Bucket, key: str) -> None:
        self._event = asyncio.Event()
        self._task = asyncio.create_task(self._run(bucket, key), name=f"turn-lock-watch:{key}")

    async def _run(self, bucket: Bucket, key: str) -> None:
        first = True
        try:
            # The first event (the key's current state) says the watch is
            # live: wake once then, since a release may have come between
            # the failed attempt and the subscription.
            async for event in bucket.watch(key, include_existing=True, meta_only=True):
                if first or event.op is not KVOp.PUT:
                    self._event.set()
                first = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the bounded poll still wakes the waiter
            logger.debug("watch on %s ended: %s", key, e)

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
