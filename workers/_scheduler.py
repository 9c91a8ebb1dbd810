"""Per-session queues inside one worker: one turn at a time per session.

Messages pulled from the partitions this worker owns land here, queued
behind their session in stream order. A session with a queue and no turn
running is *ready*; ready sessions start as long as fewer than
``max_concurrency`` turns run, the highest envelope priority first, then in
arrival order. A turn's envelope stays at the head of its queue until the
turn's outcome is settled (acked, dead-lettered, or waiting to be retried),
so a failing envelope holds back the session's later ones.

State is kept only for sessions with something held: a session whose queue
empties is forgotten, apart from its last completed stream sequence in a
bounded LRU that recognises redeliveries of work already done. That memory
holds only while the worker keeps the partition; a session it has no
memory of waits for its completion record (see
:mod:`sessionbus.workers._completions`) before its first turn, and a
settled turn's record is confirmed before the session's next turn starts.

Cancelling a running turn has three causes, recorded before the task is
cancelled: an interrupt (ack, run the next), a close (ack, discard the
rest), and a handback (leave it queued: the partition naks everything).
Whether a session is closed is not decided here: the worker asks the bus's
session states before each turn, and calls :meth:`Scheduler.close` when
they confirm a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

from nats.aio.client import Client
from nats.aio.msg import Msg
from sessionbus.bus._jsapi import ack_numbers
from sessionbus.bus._names import Names
from sessionbus.bus.errors import BusError, DecodeError, InvalidIdError, PermissionDenied
from sessionbus.schemas import Envelope, decode
from sessionbus.workers._cancel import RECANCEL_AFTER
from sessionbus.workers._completions import Completions
from sessionbus.workers._delivery import Held, ack, ack_nowait, touch
from sessionbus.workers._outcome import ACKED, Action, CancelReason, Outcome, Running
from sessionbus.workers._recent import RecentHistory
from sessionbus.workers.config import WorkerConfig

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)

#: Least the held-work cap goes down to, and the window its settle rate is measured over.
_MIN_HELD = 256
_RATE_WINDOW = 0.5
#: Subject tokens whose decoded session id is kept (the map is cleared when full).
_SID_CACHE = 65_536
#: Seconds a handback keeps cancelling a turn that does not end.
_GIVE_UP_CANCEL = 30.0
#: Seconds before a dead letter the role may not publish is tried again (a
#: refusal comes back at once; a retry every ``retry_backoff`` would only log).
_REFUSED_PAUSE = 5.0


def _always(partition: int) -> bool:
    return True


class _Session:
    __slots__ = ("closing", "looking_up", "partition", "queue", "ready", "running", "sid",
                 "timer")

    def __init__(self, sid: str, partition: int) -> None:
        self.sid = sid
        self.partition = partition
        self.queue: list[Held] = []
        self.running: Running | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ready = False
        self.closing = False
        #: Waiting for its completion record before any turn starts.
        self.looking_up = False


Execute = Callable[[Held, Running], Awaitable[Outcome]]
DeadLetter = Callable[[Held, str], Awaitable[None]]


class Scheduler:
    """Holds pulled messages per session and runs their turns."""

    def __init__(
        self,
        *,
        nc: Client,
        names: Names,
        execute: Execute,
        dead_letter: DeadLetter,
        max_concurrency: int,
        config: WorkerConfig,
        recent: RecentHistory | None = None,
        completions: Completions | None = None,
    ) -> None:
        self._nc = nc
        self._completions = completions
        self._recent = recent
        self._names = names
        self._execute = execute
        self._dead_letter = dead_letter
        self._max_concurrency = max_concurrency
        self._config = config
        self._sessions: dict[str, _Session] = {}
        self._by_partition: dict[int, set[str]] = {}
        self._frozen: set[int] = set()
        self._ready: list[tuple[int, int, _Session]] = []
        self._counter = itertools.count()
        self._running = 0
        self._held = 0
        self._reserved = 0
        self._starved = False
        self._room_events: set[asyncio.Event] = set()
        # Session -> (last completed sequence, its partition, that partition's epoch).
        self._last_done: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        # Partition -> how many times it was taken away: older memories are void.
        self._epochs: dict[int, int] = {}
        self._lookups: dict[str, _Session] = {}
        self._lookup_task: asyncio.Task[None] | None = None
        # Subject token -> session id, for tokens that decoded (decoding is pure).
        self._sids: dict[str, str] = {}
        self.owns: Callable[[int], bool] = _always
        """Whether this worker still owns a partition; settling (ack, dead-letter) asks first."""
        self.completed = 0
        # Settle-rate window behind _cap(): loop time and completions at its start.
        self._rate_at = 0.0
        self._rate_done = 0
        self._held_cap = config.max_held
        """Envelopes settled (acked after a turn, dropped, dead-lettered) since start."""

    # -- introspection ------------------------------------------------------

    @property
    def held(self) -> int:
        """Messages held (queued or running)."""
        return self._held

    @property
    def running(self) -> int:
        """Turns running now."""
        return self._running

    @property
    def session_count(self) -> int:
        """Sessions with per-session state (something queued, running or waiting)."""
        return len(self._sessions)

    @property
    def awaiting_records(self) -> int:
        """Sessions held back until their completion record is read (none can start yet)."""
        return sum(1 for session in self._sessions.values() if session.looking_up)

    @property
    def dedupe_size(self) -> int:
        """Sessions whose last completed sequence is remembered."""
        return len(self._last_done)

    def reserve(self, wanted: int) -> int:
        """Reserve room for up to ``wanted`` messages about to be pulled; returns the grant.

        Partitions pull concurrently: reserving keeps them together under
        ``max_held``. Give the grant back with :meth:`unreserve` once the
        pulled messages were offered. Near the cap a pull waits for a
        :meth:`_chunk` of room rather than take what one settle frees: else
        every partition pulls a message or two per round trip, and a
        worker at its cap spends its time on pull requests.
        """
        room = self._cap() - self._held - self._reserved
        grant = min(wanted, room) if room >= self._chunk() else 0
        self._reserved += grant
        if grant == 0:
            self._starved = True
        return grant

    def unreserve(self, grant: int) -> None:
        """Return a grant from :meth:`reserve`."""
        self._reserved -= grant

    async def stop(self) -> None:
        """Stop reading completion records (the worker is leaving)."""
        task, self._lookup_task = self._lookup_task, None
        self._lookups.clear()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def room(self) -> int:
        """Messages that may still be pulled before the soft cap ``max_held`` (0 below a chunk)."""
        room = self._cap() - self._held - self._reserved
        return room if room >= self._chunk() else 0

    def _chunk(self) -> int:
        """The least room worth a burst pull: an eighth of the cap, at most ``fetch_batch``."""
        return max(1, min(self._config.fetch_batch, self._held_cap // 8))

    def _cap(self) -> int:
        """``max_held``, lowered to what this worker settles in a quarter of ``ack_wait``.

        A worker slower than its pulls would otherwise hold thousands of
        messages that each need an ``in_progress`` before ``ack_wait`` runs
        out; a busy event loop then sends some too late and the server
        redelivers to a worker that is alive. Held work is kept to what the
        recent settle rate clears in ``ack_wait / 4`` (at least ``_MIN_HELD``):
        most of it is settled before its first ``in_progress`` is due.
        """
        now = asyncio.get_running_loop().time()
        elapsed = now - self._rate_at
        if elapsed >= _RATE_WINDOW:
            rate = (self.completed - self._rate_done) / elapsed
            self._rate_at, self._rate_done = now, self.completed
            self._held_cap = min(self._config.max_held,
                                 max(_MIN_HELD, int(rate * self._config.ack_wait / 4)))
        return self._held_cap

    def on_room(self, event: asyncio.Event, *, listen: bool = True) -> None:
        """Have ``event`` set when room frees up after a :meth:`reserve` came back empty."""
        if listen:
            self._room_events.add(event)
        else:
            self._room_events.discard(event)

    def _freed(self) -> None:
        # Pullers at the cap wait in keep-alive pulls; wake them once room
        # frees, rather than after their next keep-alive.
        if self._starved and self._held + self._reserved <= self._held_cap - self._chunk():
            self._starved = False
            for event in self._room_events:
                event.set()

    def running_in(self, partition: int) -> list[Running]:
        """Turns running on sessions of ``partition``."""
        out = []
        for sid in self._by_partition.get(partition, ()):
            run = self._sessions[sid].running
            if run is not None:
                out.append(run)
        return out

    # -- intake -------------------------------------------------------------

    async def offer(self, partition: int, msgs: Iterable[Msg], *,
                    requested_at: float | None = None) -> None:
        """Queue messages pulled from ``partition`` and start what can start.

        ``requested_at`` is the loop time of the pull request that brought
        them (the earliest the server can have started their ack timers):
        their first ``in_progress`` is due counting from then, not from
        when a busy event loop got round to queueing them.
        """
        loop_time = asyncio.get_running_loop().time()
        if requested_at is not None:
            loop_time = min(loop_time, requested_at)
        for msg in msgs:
            await self._offer_one(partition, msg, loop_time)
        if self._lookups and self._lookup_task is None:
            self._lookup_task = asyncio.create_task(self._look_up(), name="completion-lookup")
        self._pump()

    async def _offer_one(self, partition: int, msg: Msg, now: float) -> None:
        numbers = ack_numbers(msg.reply)
        if numbers is None:  # not a JetStream delivery: nothing to ack
            logger.warning("ignoring a non-JetStream message on %s", msg.subject)
            return
        seq, delivered = numbers.stream_seq, numbers.delivered
        token = msg.subject.rsplit(".", 1)[-1]
        error: DecodeError | None = None
        envelope: Envelope | None = None
        cached = self._sids.get(token)
        if cached is not None:
            sid = cached
        else:
            try:
                sid = self._names.session_of_subject(msg.subject)
            except InvalidIdError:
                sid = token  # published around the bus: keep it apart, dead-letter it
                error = DecodeError(f"subject token {token!r} is not the canonical encoding "
                                    f"of a session id", msg.data)
            else:
                if len(self._sids) >= _SID_CACHE:
                    self._sids.clear()
                self._sids[token] = sid
        if error is None:
            try:
                envelope = decode(msg.data, Envelope)
            except DecodeError as e:
                error = e
        if self._recent is not None:
            # Every delivery, whatever becomes of it: the cache mirrors the stream.
            dseq = numbers.consumer_seq
            if error is None or envelope is not None:
                self._recent.observe(partition, dseq, seq, sid, envelope)
            else:
                self._recent.observe_delivery(partition, dseq)
        last = self._done_seq(sid)
        if last is not None and seq <= last:
            await self._nc.publish(msg.reply, b"+ACK")  # a redelivery of finished work
            return
        session = self._sessions.get(sid)
        if session is None:
            session = self._sessions[sid] = _Session(sid, partition)
            self._by_partition.setdefault(partition, set()).add(sid)
            if last is None and self._completions is not None:
                session.looking_up = True
                self._lookups[sid] = session
        queue = session.queue
        if queue and queue[-1].seq >= seq:
            await self._insert_or_replace(session, seq, msg, delivered, now,
                                          envelope, error)
            return
        queue.append(Held(seq=seq, partition=partition, session_id=sid, msg=msg,
                          envelope=envelope, error=error, delivered=delivered,
                          touched=now))
        self._held += 1
        self._make_ready(session)

    async def _insert_or_replace(
        self, session: _Session, seq: int, msg: Msg, delivered: int, now: float,
        envelope: Envelope | None, error: DecodeError | None,
    ) -> None:
        for held in session.queue:
            if held.seq == seq:
                # A redelivered copy of something held (ack_wait passed while the
                # event loop was busy): answer through the newest delivery.
                held.msg = msg
                held.delivered = delivered
                break
        else:
            session.queue.append(Held(seq=seq, partition=session.partition,
                                      session_id=session.sid, msg=msg, envelope=envelope,
                                      error=error, delivered=delivered, touched=now))
            session.queue.sort(key=lambda h: h.seq)
            self._held += 1
            self._make_ready(session)
        # The server restarted this message's ack timer: restart the later
        # ones too, so a failover redelivers the session's envelopes in order.
        await self._touch_session(session, now)

    # -- scheduling ---------------------------------------------------------

    async def _look_up(self) -> None:
        """Read the completion records of new sessions, ack what they cover, let them run."""
        assert self._completions is not None
        try:
            while self._lookups:
                batch, self._lookups = self._lookups, {}
                epochs = {sid: self._epochs.get(s.partition, 0) for sid, s in batch.items()}
                try:
                    found = await self._completions.lookup(batch)
                except Exception as e:  # the server or the connection: try again
                    logger.warning("reading %d completion records failed (%r); retrying",
                                   len(batch), e)
                    for sid, s in batch.items():
                        if self._sessions.get(sid) is s:
                            self._lookups.setdefault(sid, s)
                    await asyncio.sleep(self._config.retry_backoff)
                    continue
                covered: list[Held] = []
                for sid, s in batch.items():
                    if (self._sessions.get(sid) is not s
                            or self._epochs.get(s.partition, 0) != epochs[sid]):
                        continue  # forgotten, or its partition taken away meanwhile
                    done = found.get(sid, 0)
                    self._remember(sid, s.partition, done)
                    s.looking_up = False
                    while s.queue and s.queue[0].seq <= done:
                        covered.append(s.queue.pop(0))  # completed before: not run again
                        self._held -= 1
                    if s.queue:
                        self._make_ready(s)
                    else:
                        self._forget(s)
                self._freed()
                self._pump()
                for held in covered:
                    with contextlib.suppress(Exception):  # unacked: redelivered, acked then
                        await ack(self._nc, held)
        finally:
            self._lookup_task = None

    def _make_ready(self, session: _Session) -> None:
        if (session.ready or session.running is not None or session.timer is not None
                or session.looking_up):
            return
        if not session.queue or session.closing:
            return
        session.ready = True
        heapq.heappush(self._ready, (-session.queue[0].priority, next(self._counter), session))

    def _pump(self) -> None:
        while self._running < self._max_concurrency and self._ready:
            _, _, session = heapq.heappop(self._ready)
            session.ready = False
            if self._sessions.get(session.sid) is not session or not session.queue:
                continue
            if session.running is not None or session.timer is not None:
                continue
            if session.partition in self._frozen:
                continue
            self._start(session)

    def _start(self, session: _Session) -> None:
        run = self._begin(session)
        run.task = asyncio.create_task(self._drain(session, run))

    def _begin(self, session: _Session) -> Running:
        run = Running(session.queue[0])
        session.running = run
        self._running += 1
        return run

    async def _drain(self, session: _Session, run: Running) -> None:
        """Run the session's turns one after another in this task while nothing else waits.

        A session with a backlog keeps its task (no task, heap push and pop per
        envelope) as long as no other session is waiting for a slot; the
        partition frozen, a close, a retry timer or a waiting session end it,
        and the session queues again as before.
        """
        while True:
            try:
                await self._turn(session, run)
            except BaseException:
                self._after_turn(session)  # a cancel of the task itself, as before
                raise
            if not self._may_continue(session):
                self._after_turn(session)
                return
            # Yield before the session's next turn: the client's flusher then
            # writes this turn's ack to the socket first. Otherwise a pause or
            # a crash right after could leave the envelope unacked while the
            # next one already ran, and the successor would run it again
            # after its successor.
            await asyncio.sleep(0)
            if not self._may_continue(session):
                self._after_turn(session)
                return
            run = self._begin(session)
            run.task = asyncio.current_task()

    def _may_continue(self, session: _Session) -> bool:
        return (not self._ready and bool(session.queue) and session.running is None
                and session.timer is None and not session.closing
                and self._running < self._max_concurrency
                and session.partition not in self._frozen
                and self._sessions.get(session.sid) is session)

    async def _turn(self, session: _Session, run: Running) -> None:
        held = run.held
        outcome: Outcome | None
        run.started = True
        try:
            try:
                if run.cancel_reason is not None:  # cancelled before it began
                    raise asyncio.CancelledError
                if self._completions is not None and self._completions.pending(session.sid):
                    # The previous turn's record first: were its ack lost, this
                    # turn would otherwise be followed by a rerun of that one.
                    await self._completions.confirm(session.sid)
                outcome = await self._execute(held, run)
            except asyncio.CancelledError:
                if run.cancel_reason is None:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                outcome = None if run.cancel_reason is CancelReason.HANDBACK else ACKED
            run.finished = True
            if outcome is not None:
                await self._settle(session, held, outcome)
            elif session.timer is None and session.partition not in self._frozen:
                # Handed back without a freeze (the worker found it no longer
                # owns the partition): retry after a pause, not in a tight loop.
                loop = asyncio.get_running_loop()
                session.timer = loop.call_later(self._config.retry_backoff, self._wake, session)
            if session.closing and session.timer is None:
                await self._ack_queue(session)
        except Exception as e:
            if isinstance(e, BusError):  # e.g. the session record unreadable while cut off
                logger.warning("stream sequence %d of %r put off: %s", held.seq, session.sid, e)
            else:
                logger.exception("settling stream sequence %d of %r failed", held.seq,
                                 session.sid)
            if session.timer is None:  # try again later, not in a tight loop
                loop = asyncio.get_running_loop()
                session.timer = loop.call_later(self._config.retry_backoff, self._wake, session)
        finally:
            session.running = None
            self._running -= 1

    async def _settle(self, session: _Session, held: Held, outcome: Outcome) -> None:
        if outcome.action is Action.RETRY:
            held.failures += 1
            loop = asyncio.get_running_loop()
            session.timer = loop.call_later(outcome.delay, self._wake, session)
            return
        if not self.owns(held.partition):
            # A stale turn (the partition was lost while it ran): its ack must
            # not land as if it still owned the session. The server redelivers.
            logger.warning("not settling stream sequence %d of %r: partition %d was lost",
                           held.seq, session.sid, held.partition)
            return
        if outcome.action is Action.DEAD:
            try:
                await self._dead_letter(held, outcome.reason)
            except BusError as e:
                logger.warning("%s; retrying", e)
                pause = self._config.retry_backoff
                if isinstance(e, PermissionDenied):
                    pause = max(pause, _REFUSED_PAUSE)
                loop = asyncio.get_running_loop()
                session.timer = loop.call_later(pause, self._wake, session)
                return
        through = self._settled_through(session, held)
        # Both queued without a coroutine each, the record first.
        if self._completions is not None and outcome.ran:
            flush = self._completions.record_nowait(session.sid, through, held.partition)
            if flush is not None:
                await flush
        flush = ack_nowait(self._nc, held)
        if flush is not None:
            await flush
        self._pop_head(session, held, through)

    @staticmethod
    def _settled_through(session: _Session, held: Held) -> int:
        """The highest sequence of the session settled with everything before it.

        ``held`` just settled; an earlier envelope still queued behind it (one
        redelivered late) is not settled, so nothing from it on may count as
        done, neither here nor in a record a successor trusts.
        """
        queue = session.queue  # in stream order: only its head can be earlier
        lowest = queue[0].seq if queue and queue[0] is not held else held.seq
        return held.seq if lowest >= held.seq else lowest - 1

    def _pop_head(self, session: _Session, held: Held, through: int) -> None:
        # Normally the head; an earlier envelope inserted while this one ran
        # must not make the finished one run again.
        queue = session.queue
        index = 0 if queue and queue[0] is held else next(
            (i for i, h in enumerate(queue) if h is held), None)
        if index is not None:
            session.queue.pop(index)
            self._held -= 1
            self.completed += 1
            # Not past an earlier envelope still queued: its redelivered
            # copies would be acked unrun.
            self._remember(session.sid, session.partition, through)
            self._freed()

    def _wake(self, session: _Session) -> None:
        session.timer = None
        if self._sessions.get(session.sid) is session:
            self._make_ready(session)
            self._pump()

    def _after_turn(self, session: _Session) -> None:
        if not session.queue and session.timer is None:
            self._forget(session)
        else:
            self._make_ready(session)
        self._pump()

    def _forget(self, session: _Session, *, force: bool = False) -> None:
        if self._sessions.get(session.sid) is session and (force or session.running is None):
            del self._sessions[session.sid]
            sids = self._by_partition.get(session.partition)
            if sids is not None:
                sids.discard(session.sid)
                if not sids:
                    del self._by_partition[session.partition]
            if session.timer is not None:
                session.timer.cancel()
                session.timer = None

    def _done_seq(self, sid: str) -> int | None:
        """The session's last completed sequence, if this worker knows it for sure."""
        entry = self._last_done.get(sid)
        if entry is None:
            return None
        seq, partition, epoch = entry
        if self._epochs.get(partition, 0) != epoch:
            del self._last_done[sid]  # from before the partition was taken away
            return None
        return seq

    def _remember(self, sid: str, partition: int, seq: int) -> None:
        last = self._done_seq(sid)
        if last is None or seq > last:
            self._last_done[sid] = (seq, partition, self._epochs.get(partition, 0))
        self._last_done.move_to_end(sid)
        while len(self._last_done) > self._config.dedupe_size:
            self._last_done.popitem(last=False)

    # -- keeping held messages alive ---------------------------------------

    async def touch_due(self) -> int:
        """Send ``in_progress`` for every session whose oldest held message is due.

        A session's messages are touched together, in stream order, so their
        ack timers stay in the same order as their sequences; then a dead
        worker's messages come back to the next owner in order.
        """
        now = asyncio.get_running_loop().time()
        limit = now - self._config.touch_after
        touched = 0
        for session in list(self._sessions.values()):
            if session.queue and session.queue[0].touched <= limit:
                touched += await self._touch_session(session, now)
        return touched

    async def _touch_session(self, session: _Session, now: float) -> int:
        for held in list(session.queue):
            await touch(self._nc, held, now)
        return len(session.queue)

    # -- close and interrupt ------------------------------------------------

    def interrupt(self, sid: str) -> bool:
        """Cancel the session's running turn (its envelope is acked); True if one ran."""
        session = self._sessions.get(sid)
        if session is None or session.running is None:
            return False
        return session.running.cancel(CancelReason.INTERRUPT)

    def session_ids(self) -> list[str]:
        """Sessions with something held (queued or running)."""
        return list(self._sessions)

    async def close(self, sid: str) -> None:
        """The session closed: cancel its turn, ack and forget everything queued."""
        session = self._sessions.get(sid)
        if session is None:
            return
        session.closing = True
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        if session.running is not None:
            session.running.cancel(CancelReason.CLOSE)  # the turn acks the rest when it ends
            return
        await self._ack_queue(session)
        self._forget(session)

    async def _ack_queue(self, session: _Session) -> None:
        queue, session.queue = session.queue, []
        self._held -= len(queue)
        self._freed()
        for held in queue:
            await ack(self._nc, held)
            self.completed += 1
            self._remember(session.sid, session.partition, held.seq)

    # -- handing partitions back --------------------------------------------

    def freeze(self, partition: int) -> None:
        """Start no new turn on ``partition`` (its queued messages stay held)."""
        self._frozen.add(partition)

    def unfreeze(self, partition: int) -> None:
        """Let turns start on ``partition`` again."""
        self._frozen.discard(partition)
        for sid in self._by_partition.get(partition, ()):
            self._make_ready(self._sessions[sid])
        self._pump()

    async def wait_idle(self, partition: int, within: float) -> bool:
        """Wait until no turn runs on ``partition``; False if some still run after ``within`` s."""
        running = [r.task for r in self.running_in(partition) if r.task is not None]
        if not running:
            return True
        _, pending = await asyncio.wait(running, timeout=within)
        return not pending and not self.running_in(partition)

    async def cancel_partition(self, partition: int) -> None:
        """Cancel the turns running on ``partition``, leaving their envelopes held.

        Gives up after ``_GIVE_UP_CANCEL`` seconds on a handler that ignores
        cancellation; :meth:`take_partition` then abandons its session.
        """
        runs = {r.task: r for r in self.running_in(partition) if r.task is not None}
        for run in runs.values():
            run.cancel(CancelReason.HANDBACK)
        pending = set(runs)
        deadline = asyncio.get_running_loop().time() + _GIVE_UP_CANCEL
        while pending and asyncio.get_running_loop().time() < deadline:
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER)
            for task in pending:
                # A cancel can be lost (see sessionbus.workers._cancel): repeat it, but
                # never cut an ack or dead-letter of a finished handler short.
                if not runs[task].finished:
                    task.cancel()
        for task in pending:
            logger.error("a turn of %r ignores cancellation; its session is abandoned",
                         runs[task].held.session_id)

    def take_partition(self, partition: int) -> list[Held]:
        """Remove and return every message held for ``partition``.

        A session whose turn still runs (it ignored cancellation) is not
        returned but forgotten: its messages get no more ``in_progress``, so
        the server redelivers them, in order, before the partition's pin can
        lapse to another worker.
        """
        out: list[Held] = []
        # What it completed here may be followed by another owner's turns.
        self._epochs[partition] = self._epochs.get(partition, 0) + 1
        if self._completions is not None:
            self._completions.forget_partition(partition)
        if self._recent is not None:
            self._recent.drop_partition(partition)
        for sid in list(self._by_partition.get(partition, ())):
            session = self._sessions[sid]
            self._held -= len(session.queue)
            if session.running is None:
                out.extend(session.queue)
            session.queue = []
            self._forget(session, force=True)
        self._freed()
        return out

