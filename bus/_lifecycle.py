"""Session lifecycle in KV: records, idle timers, tasks, expiry and the close broadcast.

A session's record (:class:`~sessionbus.schemas.SessionMetadata`) lives in the sessions
bucket under ``names.session_key(sid)`` and is only ever written with
compare-and-set: read, change, write at the revision read, retry on
:class:`~sessionbus.bus.errors.KeyConflict`, give up with
:class:`~sessionbus.bus.errors.ConcurrentUpdate`. Whoever wins the write that moves a
session to CLOSED or EXPIRED is the one process that publishes the close
broadcast on ``names.closed(sid)``, so a session is announced closed exactly
once however many nodes race to close or expire it. A terminal record is
written with a TTL of ``bus.envelope_max_age`` (the envelope stream's
``max_age``) so records do not pile up after their history is gone.

Idle expiry is a separate key, ``names.session_timer_key(sid)``, written with
a per-key TTL on open and refreshed on activity (send, touch), rate-limited
per bus; :mod:`sessionbus.bus._timers` writes it (``lifecycle.timers``).

When a timer runs out the server writes a marker; the :class:`ExpiryWatcher`
(a watch on the timer keys) turns it into EXPIRED. **Who must run it:** any
bus that opened a session with a TTL starts it lazily, and
``SessionBus.start_lifecycle()`` starts it explicitly (workers do). As long
as one such bus is up, sessions expire on time; several watchers are safe
(one CAS wins). A timer that ran out while no watcher was up is caught the
next time anyone reads the record with ``Session.info()``.

What this process knows about each session (the records read and written
here, close and open hints, envelope depths) is kept by one owner,
:class:`~sessionbus.bus._states.SessionStates` (``lifecycle.states``): every
read and write below feeds it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from sessionbus.bus._expiry import ExpiryWatcher
from sessionbus.bus._feeds import Feed
from sessionbus.bus._retry import Retry, Unanswered
from sessionbus.bus._states import SessionStates
from sessionbus.bus._timers import IdleTimers
from sessionbus.bus.errors import (
    BusError,
    BusTimeout,
    ConcurrentUpdate,
    ConfigError,
    DecodeError,
    KeyConflict,
    SessionExists,
    SessionNotFound,
    SessionTerminated,
    TaskNotFound,
    nats_errors,
)
from sessionbus.schemas import (
    Envelope,
    SessionMetadata,
    SessionState,
    TaskInfo,
    TaskState,
    decode,
    encode,
)

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

__all__ = ["IDLE_REASON", "Lifecycle", "task_id_for"]

logger = logging.getLogger(__name__)

#: ``close_reason`` of a session that expired for lack of activity.
IDLE_REASON = "idle"
#: Compare-and-set attempts on a session record before ConcurrentUpdate.
MAX_CAS_ATTEMPTS = 25
#: Terminal tasks kept in a record; older ones are dropped (open ones never).
MAX_TERMINAL_TASKS = 256
#: A record older than this with no idle timer is expired when read.
_IDLE_GRACE = 2.0
#: Seconds the delete marker of a removed idle timer is kept.
_TIMER_MARKER_TTL = 60.0
_TASK_NS = uuid.UUID("0b5e8d7e-2f55-4a4e-8f0e-7f5d1c9b3a20")


def task_id_for(envelope_id: str, agent: str) -> str:
    """The task id of ``agent``'s turn on ``envelope_id``: a redelivery finds the same task."""
    return uuid.uuid5(_TASK_NS, f"{envelope_id}\x00{agent}").hex


def _prune_tasks(tasks: dict[str, TaskInfo]) -> dict[str, TaskInfo]:
    done = [t for t in tasks.values() if t.is_terminal()]
    if len(done) <= MAX_TERMINAL_TASKS:
        return tasks
    done.sort(key=lambda t: t.updated_at)
    drop = {t.task_id for t in done[: len(done) - MAX_TERMINAL_TASKS]}
    return {tid: t for tid, t in tasks.items() if tid not in drop}


class Lifecycle:
    """One bus's view of session lifecycles: records, timers, tasks and closures.

    Created and started by :class:`~sessionbus.bus.SessionBus` (``sb.lifecycle``) and
    stopped with it. Sessions use it; the worker runtime and the session
    manager may too (``add_task``, ``update_task``, ``remember``).
    """

    def __init__(self, bus: SessionBus) -> None:
        self._bus = bus
        #: What this process knows about each session (see :mod:`sessionbus.bus._states`).
        self.states = SessionStates(bus)
        #: This bus's idle-timer writes (see :mod:`sessionbus.bus._timers`).
        self.timers = IdleTimers(bus)
        self._watcher: ExpiryWatcher | None = None
        self._feeds: set[Feed[Any]] = set()

    async def start(self) -> None:
        """Subscribe to every session's close and open hints."""
        await self.states.start()

    async def stop(self) -> None:
        """End the feeds, settle the idle timers, stop the expiry watcher and close listener.

        Timers this bus wrote without their ack and the watcher has not
        confirmed are written acknowledged first (a few seconds at most).
        """
        for feed in list(self._feeds):
            try:
                await feed.aclose()
            except Exception:
                logger.exception("error closing %r", feed)
        # Before the watcher stops: it confirms the timers it sees meanwhile.
        await self.timers.stop(watching=self._watcher is not None and self._watcher.ready)
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        await self.states.stop()

    def adopt(self, feed: Feed[Any]) -> None:
        """End ``feed`` when the bus closes (a reader must not wait on a closed bus)."""
        self._feeds.add(feed)

    def release(self, feed: Feed[Any]) -> None:
        """Forget a feed that was closed."""
        self._feeds.discard(feed)

    async def start_expiry_watcher(self) -> None:
        """Run the expiry watcher on this bus (idempotent); it stops with the bus."""
        if self._watcher is None:
            self._watcher = ExpiryWatcher(bus=self._bus, expire=self.expire_idle,
                                          seen=self.timers.seen)
            await self._watcher.start()

    @property
    def watcher(self) -> ExpiryWatcher | None:
        """The expiry watcher this bus runs, if any."""
        return self._watcher

    @property
    def watching(self) -> bool:
        """Whether this bus runs the expiry watcher."""
        return self._watcher is not None

    # -- records ------------------------------------------------------------

    async def open(self, meta: SessionMetadata) -> None:
        """Store a new session's record and, if it has an idle TTL, its timer.

        One acknowledged write: the timer goes out right after the record, in
        the same flush, and is confirmed by this bus's expiry watcher (see
        :mod:`sessionbus.bus._timers`).
        The record is still a compare-and-set create: :class:`SessionExists`
        if the id is taken. The timer went out before that was known, with
        this open's TTL; it is then put back as the taken session has it
        (see :meth:`_restore_timer`).
        """
        ttl = meta.ttl_seconds
        if ttl is None:
            await self.create(meta)
            return
        # Someone must turn this session's timer marker into EXPIRED.
        await self.start_expiry_watcher()
        watcher = self._watcher
        if self.timers.can_skip_ack(watching=watcher is not None and watcher.ready):
            sid = meta.session_id
            try:
                await self.create(meta, also=lambda: self.timers.write_unacked(sid, ttl))
            except SessionExists:
                await self._restore_timer(sid)
                raise
            return
        results = await asyncio.gather(
            self.create(meta), self.timers.refresh(meta.session_id, ttl, force=True),
            return_exceptions=True,
        )
        if isinstance(results[0], SessionExists):
            await self._restore_timer(meta.session_id)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _restore_timer(self, session_id: str) -> None:
        """Undo the timer a refused open wrote over a taken session's.

        Rare (a racing open of one id), so it costs a read and a write: an
        active session's timer is written again with its own TTL, one with
        no TTL loses the timer key; an ended session needs nothing (a timer
        that runs out on a terminal record changes nothing). The refused
        open's write is no longer confirmed nor repaired. Written after the
        wrong timer on the same connection, so stored after it.
        """
        self.timers.forget(session_id)
        try:
            meta = await self.load(session_id)
            if meta is None or meta.is_terminal():
                return
            if meta.ttl_seconds is not None:
                await self.timers.refresh(session_id, meta.ttl_seconds, force=True)
                return
            with nats_errors(f"deleting the timer of {session_id!r}"):
                await self._bus.sessions_kv.delete(
                    self._bus.names.session_timer_key(session_id), ttl=_TIMER_MARKER_TTL)
        except BusError as e:
            logger.error("session %r may expire early: a refused open wrote its idle timer"
                         " and restoring it failed: %s", session_id, e)

    async def create(self, meta: SessionMetadata, *,
                     also: Callable[[], Awaitable[None]] | None = None) -> None:
        """Store a new record; :class:`SessionExists` if the id is taken.

        ``also`` is published right after the record, before its ack is awaited.
        A write nobody answered (a stream leader paused or electing) may have
        been stored: it is sent again, ``also`` with it, up to
        ``UNANSWERED_WRITES`` attempts in all, and when a later attempt finds
        the id taken, a stored record equal to this one is this open's own.
        """
        key = self._bus.names.session_key(meta.session_id)
        raw = encode(meta)
        unanswered = Unanswered(f"creating session {meta.session_id!r}: the write")
        while True:
            try:
                with nats_errors(f"creating session {meta.session_id!r}"):
                    revision, replaced = await self._bus.sessions_kv.insert(
                        key, raw, also=also, resend_unanswered=False)
                break
            except KeyConflict as e:
                own = await self._stored_as(key, raw) if unanswered.count else None
                if own is None:
                    raise SessionExists(meta.session_id) from e
                # Whether it replaced an earlier record is not known: hint as if it did.
                revision, replaced = own, True
                break
            except BusTimeout as e:
                unanswered.again(e)
        if replaced:
            # The id was used before (its old record was removed or expired):
            # processes that knew it ended must read it again.
            await self.states.announce_opened(meta, revision)
        else:
            # Nothing was stored under the id: a process may only know it ended
            # from a terminal record old enough to have expired, and such
            # knowledge is not trusted (see SessionStates.meta).
            self.states.note(meta, revision)

    async def _stored_as(self, key: str, raw: bytes, *, after: int = 0) -> int | None:
        """The revision of ``key`` if it holds exactly ``raw``, else None.

        Called when a write expecting ``key`` at revision ``after`` (0: not
        there) was refused: a later revision is stored, or being stored (a
        replicated stream's leader refuses the write while an earlier
        attempt is still in process). A replica that has not applied it yet
        shows the key empty or at ``after``: read again then, for up to the
        bucket's timeout.
        """
        kv = self._bus.sessions_kv
        retry = Retry(kv.timeout)
        while True:
            with nats_errors(f"reading {key!r}"):
                entry = await kv.get(key)
            if entry is not None and entry.revision > after:
                return entry.revision if entry.value == raw else None
            if not await retry.again(TimeoutError()):
                return None

    async def load(self, session_id: str) -> SessionMetadata | None:
        """The stored record, or None."""
        read = self.states.mark()
        key = self._bus.names.session_key(session_id)
        with nats_errors(f"reading session {session_id!r}"):
            entry = await self._bus.sessions_kv.get(key)
        if entry is None:
            self.states.note_missing(session_id, read=read)
            return None
        meta = decode(entry.value, SessionMetadata)
        self.states.note(meta, entry.revision, read=read)
        return meta

    async def modify(
        self, session_id: str, change: Callable[[SessionMetadata], SessionMetadata | None]
    ) -> tuple[SessionMetadata, bool]:
        """Apply ``change`` to the record with compare-and-set; return it and whether it wrote.

        ``change`` returns None to leave the record as it is; it may raise to
        abort. It can run several times, against fresher records each time.
        """
        meta, _, wrote = await self._modify(session_id, change)
        return meta, wrote

    async def _modify(
        self, session_id: str, change: Callable[[SessionMetadata], SessionMetadata | None],
        *, from_known: bool = False,
    ) -> tuple[SessionMetadata, int, bool]:
        kv, key = self._bus.sessions_kv, self._bus.names.session_key(session_id)
        # Records this call wrote without an answer: stored, for all it knows.
        unanswered: set[bytes] = set()
        if from_known:
            # One round trip instead of two: write from the record as this
            # process last saw it, at that revision. The server checks the
            # revision, so a stale copy only costs the read it skipped.
            written = await self._write_from_known(session_id, change, unanswered)
            if written is not None:
                return written
        backoff = 0.002
        for _ in range(MAX_CAS_ATTEMPTS):
            read = self.states.mark()
            with nats_errors(f"reading session {session_id!r}"):
                entry = await kv.get(key)
            if entry is None:
                self.states.note_missing(session_id, read=read)
                raise SessionNotFound(session_id)
            current = decode(entry.value, SessionMetadata)
            if entry.value in unanswered:
                # One of this call's writes, stored after all (its read-back
                # gave up before a replica showed it): this call made the change.
                if not current.is_terminal():
                    self.states.note(current, entry.revision)
                return current, entry.revision, True
            updated = change(current)
            if updated is None:
                self.states.note(current, entry.revision, read=read)
                return current, entry.revision, False
            revision = await self._update(session_id, updated, last=entry.revision,
                                          unanswered=unanswered)
            if revision is None:
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, 0.1)
                continue
            if not updated.is_terminal():
                # A terminal record is noted by terminate(), which announces it.
                self.states.note(updated, revision)
            return updated, revision, True
        raise ConcurrentUpdate(session_id, MAX_CAS_ATTEMPTS)

    async def _write_from_known(
        self, session_id: str, change: Callable[[SessionMetadata], SessionMetadata | None],
        unanswered: set[bytes],
    ) -> tuple[SessionMetadata, int, bool] | None:
        """The compare-and-set of :meth:`_modify` from the known record; None: read instead."""
        known = self.states.get(session_id)
        if known is None or known.meta is None or not known.full:
            return None
        updated = change(known.meta)
        if updated is None:
            return None  # a write that is not needed is only decided on a fresh read
        revision = await self._update(session_id, updated, last=known.revision,
                                      unanswered=unanswered)
        if revision is None:
            return None
        if not updated.is_terminal():
            self.states.note(updated, revision)
        return updated, revision, True

    async def _update(self, session_id: str, updated: SessionMetadata, *,
                      last: int, unanswered: set[bytes]) -> int | None:
        """Write ``updated`` if the record is still at revision ``last``: the new revision.

        None when the record has moved on. A write nobody answered may have
        been stored: it is sent again, up to ``UNANSWERED_WRITES`` attempts
        in all, and its bytes are added to ``unanswered``. When a later
        attempt finds the record moved on, a stored record equal to
        ``updated`` is taken as this write's own (a close stamps the record
        with its time: no other close stores the same bytes); should no
        replica show it within the bucket's timeout, the caller's next read
        still knows it by ``unanswered``. So a close whose answer was lost
        is still announced, by the process that made it.
        """
        key, raw = self._bus.names.session_key(session_id), encode(updated)
        # Terminal records go away with the history they describe.
        ttl = self._bus.envelope_max_age if updated.is_terminal() else None
        attempts = Unanswered(f"updating session {session_id!r}: the write")
        while True:
            try:
                with nats_errors(f"updating session {session_id!r}"):
                    return await self._bus.sessions_kv.update(key, raw, last=last, ttl=ttl,
                                                              resend_unanswered=False)
            except KeyConflict:
                return await self._stored_as(key, raw, after=last) if attempts.count else None
            except BusTimeout as e:
                unanswered.add(raw)
                attempts.again(e)

    async def terminate(
        self, session_id: str, state: SessionState, reason: str = ""
    ) -> tuple[SessionMetadata, bool]:
        """Move a session to CLOSED or EXPIRED, cascading EXPIRED to its open tasks.

        Returns the record and whether this call made the change; only then
        is the close broadcast published (by this call). A session already
        terminal is returned as it is.
        """
        if not state.is_terminal:
            raise ConfigError(f"{state} is not a terminal session state")
        idle = state is SessionState.EXPIRED and reason == IDLE_REASON

        def change(meta: SessionMetadata) -> SessionMetadata | None:
            if meta.is_terminal() or (idle and meta.ttl_seconds is None):
                return None
            return meta.terminated(state, reason)

        meta, revision, won = await self._modify(session_id, change, from_known=True)
        if not won:
            return meta, False
        self.timers.forget(session_id)
        # Announce first: the broadcast is what every node waits for.
        await self.states.announce_closed(meta, revision)
        if not idle and meta.ttl_seconds is not None:
            await self.timers.drop(session_id)
        return meta, True

    async def expire_idle(self, session_id: str) -> bool:
        """Expire a session whose idle timer ran out, unless it was refreshed since."""
        timer = self._bus.names.session_timer_key(session_id)
        with nats_errors(f"reading the timer of {session_id!r}"):
            if await self._bus.sessions_kv.get(timer) is not None:
                return False
        _, won = await self.terminate(session_id, SessionState.EXPIRED, IDLE_REASON)
        return won

    async def check_idle(self, meta: SessionMetadata) -> SessionMetadata:
        """Expire ``meta``'s session now if its timer is gone and no watcher did it."""
        if meta.is_terminal() or meta.ttl_seconds is None:
            return meta
        # A record this young may simply not have its first timer written yet.
        if time.time() - meta.created_at < _IDLE_GRACE:
            return meta
        if not await self.expire_idle(meta.session_id):
            return meta
        return await self.load(meta.session_id) or meta

    async def list_sessions(self, *, state: SessionState | None = None) -> list[SessionMetadata]:
        """Every stored session record (only those in ``state`` if given), oldest first.

        One server-side filtered listing of the record keys (idle timers are
        not fetched). A record that does not decode is skipped with a warning
        rather than failing the whole listing: one bad writer must not hide
        every other session.
        """
        with nats_errors("listing sessions"):
            entries = await self._bus.sessions_kv.list(self._bus.names.session_record_filter)
        found: list[SessionMetadata] = []
        for entry in entries:
            try:
                meta = decode(entry.value, SessionMetadata)
            except DecodeError as e:
                logger.warning("skipping undecodable session record %s: %s", entry.key, e)
                continue
            if state is None or meta.state is state:
                found.append(meta)
        found.sort(key=lambda m: (m.created_at, m.session_id))
        return found

    def limits(self, session_id: str) -> SessionMetadata | None:
        """The session's record as this bus last saw it, without its tasks (no I/O)."""
        return self.states.meta(session_id)

    # -- idle timers ----------------------------------------------------------

    async def refresh_timer(self, session_id: str, ttl: float, *, force: bool = False) -> bool:
        """Push back the idle timer, unless its slack still covers ``ttl``; True if written."""
        return await self.timers.refresh(session_id, ttl, force=force)

    # -- tasks ----------------------------------------------------------------

    async def add_task(self, session_id: str, agent: str, envelope_id: str | None) -> TaskInfo:
        """Record a QUEUED task; the same (envelope, agent) returns the existing task."""
        task_id = task_id_for(envelope_id, agent) if envelope_id else uuid.uuid4().hex
        found: list[TaskInfo] = []

        def change(meta: SessionMetadata) -> SessionMetadata | None:
            found.clear()
            existing = meta.tasks.get(task_id)
            if existing is not None:
                found.append(existing)
                return None
            if meta.is_terminal():
                raise SessionTerminated(session_id, meta.state.value)
            task = TaskInfo(task_id=task_id, agent=agent, envelope_id=envelope_id)
            found.append(task)
            tasks = _prune_tasks({**meta.tasks, task_id: task})
            return meta.model_copy(update={"tasks": tasks, "updated_at": time.time()})

        await self.modify(session_id, change)
        return found[0]

    async def update_task(self, session_id: str, task_id: str, state: TaskState) -> TaskInfo:
        """Move a task to ``state``; a task already terminal is returned unchanged."""
        found: list[TaskInfo] = []

        def change(meta: SessionMetadata) -> SessionMetadata | None:
            found.clear()
            task = meta.tasks.get(task_id)
            if task is None:
                raise TaskNotFound(session_id, task_id)
            if task.is_terminal() or task.state is state:
                found.append(task)
                return None
            now = time.time()
            task = task.model_copy(update={"state": state, "updated_at": now})
            found.append(task)
            tasks = _prune_tasks({**meta.tasks, task_id: task})
            return meta.model_copy(update={"tasks": tasks, "updated_at": now})

        await self.modify(session_id, change)
        return found[0]

    # -- delegation depths (kept by the states owner) ----------------------------

    def remember(self, envelope: Envelope) -> None:
        """Note an envelope's depth, so replies to it need no history scan."""
        self.states.remember(envelope)

    def remember_all(self, envelopes: Iterable[Envelope]) -> None:
        """Note the depth of each of ``envelopes`` (one call for a history read)."""
        self.states.remember_all(envelopes)

    def remember_depth(self, session_id: str, envelope_id: str, depth: int) -> None:
        """Note the depth of ``envelope_id`` in ``session_id``."""
        self.states.remember_depth(session_id, envelope_id, depth)

    def known_depth(self, session_id: str, envelope_id: str) -> int | None:
        """The remembered depth of ``envelope_id`` if it belongs to ``session_id``."""
        return self.states.known_depth(session_id, envelope_id)

    def __repr__(self) -> str:
        return (f"<Lifecycle {self._bus.node_id} known={len(self.states)} "
                f"watching={self.watching}>")
