"""Worker: one process's membership in a worker group, and the turns it runs.

::

    async def handle(turn: Turn) -> None:
        await turn.reply(f"echo: {turn.envelope.content}")

    async with SessionBus(url) as sb:
        await Worker(sb, group="echo", handler=handle, handle_signals=True).run()

A *group* is an agent type. Any number of worker processes join it, on any
machine or leaf node (a leaf client passes ``domain=`` to its bus). They
share the envelope stream's partitions: each partition has one durable
pinned pull consumer per group, pulled by the one worker that owns it
(:mod:`sessionbus.workers._membership`, :mod:`sessionbus.workers._partition`). Inside a worker,
sessions run one turn at a time, many sessions at once
(:mod:`sessionbus.workers._scheduler`).

Shutdown has one order: stop fetching, finish running turns under a
deadline, hand back the rest (nak'd in order, then unpinned), leave the
group. :meth:`Worker.drain` does all of it; :meth:`Worker.stop` skips the
waiting and cancels running turns instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from enum import StrEnum
from typing import Protocol

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from sessionbus.bus._closures import ClosedEvent
from sessionbus.bus._names import decode_token, validate_id
from sessionbus.bus._states import SessionStates
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusError, ConfigError, WorkerError
from sessionbus.bus.session import Session
from sessionbus.bus.settings import check_int
from sessionbus.workers._admission import Verdict, admit
from sessionbus.workers._cancel import cancel_and_wait
from sessionbus.workers._completions import Completions
from sessionbus.workers._delivery import Held, dead_letter
from sessionbus.workers._membership import Membership
from sessionbus.workers._outcome import ACKED, SKIPPED, Action, CancelReason, Outcome, Running
from sessionbus.workers._partition import PartitionPuller
from sessionbus.workers._recent import RecentHistory
from sessionbus.workers._scheduler import Scheduler
from sessionbus.workers.config import WorkerConfig
from sessionbus.workers.control import DeadLetter, Drop, Retry
from sessionbus.workers.turn import Turn

__all__ = ["Handler", "Worker", "WorkerState"]

logger = logging.getLogger(__name__)

#: Session handles kept for replies (each loads its record once).
_SESSION_HANDLES = 1024

class Handler(Protocol):
    """What a worker runs for each envelope: ``async def handle(turn: Turn) -> None``.

    Return to have the envelope acked; raise to have it retried (or see
    :mod:`sessionbus.workers.control`).
    """

    def __call__(self, turn: Turn, /) -> Awaitable[None]:
        """Handle one turn."""


class WorkerState(StrEnum):
    """Where a worker is in its life."""

    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Worker:
    """Runs ``handler`` for envelopes of a group's sessions, in order, one turn per session.

    ``max_concurrency`` bounds the turns this process runs at once;
    ``max_attempts`` the runs of one envelope before it is dead-lettered.
    ``agent`` is the participant id replies are sent as (default: the
    group). ``handle_signals=True`` drains on SIGTERM/SIGINT (a second
    signal stops at once). Timings are in ``config`` (:class:`WorkerConfig`).

    The group receives every envelope of its sessions, its own replies and
    envelopes for other participants included. With ``only_addressed=True``
    (the default) the handler sees only envelopes addressed to ``agent``
    (:meth:`~sessionbus.schemas.Envelope.is_for`: in its ``audience``, or broadcast by
    someone else); the rest are acked in stream order without a turn, like
    expired envelopes, and counted in :attr:`skipped`. So a handler that
    replies to every turn does not answer its own replies.
    ``only_addressed=False`` hands the handler every envelope.
    """

    def __init__(
        self,
        bus: SessionBus,
        *,
        group: str,
        handler: Handler,
        agent: str | None = None,
        worker_id: str | None = None,
        max_concurrency: int = 64,
        max_attempts: int = 5,
        handle_signals: bool = False,
        only_addressed: bool = True,
        config: WorkerConfig | None = None,
    ) -> None:
        self.group = validate_id(group, "group")
        self.agent = validate_id(agent, "agent id") if agent is not None else self.group
        self.worker_id = (validate_id(worker_id, "worker id") if worker_id is not None
                          else f"{bus.node_id}-{uuid.uuid4().hex[:8]}")
        if not callable(handler):
            raise ConfigError(f"handler must be an async callable, got {handler!r}")
        for name, value in (("max_concurrency", max_concurrency), ("max_attempts", max_attempts)):
            check_int(value, name, least=1)
        self.bus = bus
        self.config = config or WorkerConfig()
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.only_addressed = only_addressed
        self._skipped = 0
        self._settled_closed = 0
        self._state_tasks: set[asyncio.Task[None]] = set()
        self._handler = handler
        self._handle_signals = handle_signals
        self._state = WorkerState.NEW
        self._membership: Membership | None = None
        self._scheduler: Scheduler | None = None
        self._completions: Completions | None = None
        # Never more per session than the stream keeps: what the stream dropped
        # is no longer history.
        self._recent = RecentHistory(
            per_session=min(self.config.history_per_session,
                            bus.settings.max_envelopes_per_session),
            total=self.config.history_total)
        self._pullers: dict[int, PartitionPuller] = {}
        self._releasing: dict[int, asyncio.Task[None]] = {}
        self._subs: list[Subscription] = []
        # The bus's session states, held so that the listeners come off them
        # even while the bus closes (its accessors refuse by then).
        self._states: SessionStates | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._coordinator: asyncio.Task[None] | None = None
        self._handles: OrderedDict[str, Session] = OrderedDict()
        self._signal_tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        # Fencing: loop time of the watchdog's last beat, and the partitions
        # being dropped because this worker may no longer own them.
        self._beat = 0.0
        self._fenced: dict[int, asyncio.Task[None]] = {}

    # -- introspection ------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        """NEW, RUNNING, DRAINING or STOPPED."""
        return self._state

    @property
    def partitions(self) -> frozenset[int]:
        """Partitions this worker pulls now (including ones being handed back)."""
        return frozenset(self._pullers)

    @property
    def skipped(self) -> int:
        """Envelopes acked without a turn: expired, or not addressed to :attr:`agent`."""
        return self._skipped

    @property
    def settled_closed(self) -> int:
        """Envelopes of closed or expired sessions acked without a turn."""
        return self._settled_closed

    @property
    def scheduler(self) -> Scheduler:
        """The per-session scheduler (for metrics: ``held``, ``running``, ``session_count``)."""
        if self._scheduler is None:
            raise WorkerError("the worker is not started")
        return self._scheduler

    @property
    def membership(self) -> Membership:
        """This worker's lease and view of the group."""
        if self._membership is None:
            raise WorkerError("the worker is not started")
        return self._membership

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Join the group and start pulling; returns once the lease is written."""
        if self._state is not WorkerState.NEW:
            raise WorkerError(f"worker {self.worker_id} was already started")
        bus = self.bus
        completions = None
        if self.config.completion_records:
            completions = Completions(nc=bus.nc, bucket=bus.workers_kv, names=bus.names,
                                      group=self.group, api_prefix=bus.api_prefix,
                                      ttl=self.config.completion_ttl)
            await completions.start()
        self._completions = completions
        self._scheduler = Scheduler(
            nc=bus.nc, names=bus.names, execute=self._execute, dead_letter=self._dead_letter,
            max_concurrency=self.max_concurrency, config=self.config,
            recent=self._recent if self._recent.enabled else None, completions=completions,
        )
        self._scheduler.owns = self.owns
        self._membership = Membership(bus, group=self.group, worker_id=self.worker_id,
                                      config=self.config)
        self._subs = [await bus.nc.subscribe(bus.names.interrupt_all, cb=self._on_interrupt)]
        # Closes come from the bus's session states, confirmed by the record.
        self._states = states = bus.lifecycle.states
        states.on_closed(self._on_closed)
        states.on_stale(self._on_stale)
        try:
            await server_holds_subscriptions(bus.nc, bus.settings.request_timeout)
            await self._membership.join()
        except BaseException:
            self._unlisten()
            for sub in self._subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self._subs.clear()
            await self._membership.close()
            if completions is not None:
                await completions.stop()
            raise
        self._state = WorkerState.RUNNING
        self._coordinator = asyncio.create_task(self._coordinate(),
                                                name=f"coordinate:{self.worker_id}")
        self._beat = asyncio.get_running_loop().time()
        self._tasks = [
            asyncio.create_task(self._keep_alive(), name=f"touch:{self.worker_id}"),
            asyncio.create_task(self._watchdog(), name=f"fence:{self.worker_id}"),
        ]
        bus.add_service(self)
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal)
        logger.info("worker %s joined group %s", self.worker_id, self.group)

    async def run(self) -> None:
        """Start (unless started) and wait until drained or stopped."""
        if self._state is WorkerState.NEW:
            await self.start()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until the worker has drained or stopped."""
        await self._stopped.wait()

    async def drain(self, *, within: float | None = None) -> None:
        """Leave gracefully: finish running turns (``within`` s), hand back the rest, leave."""
        deadline = self.config.drain_timeout if within is None else within
        await self._shutdown(graceful=True, within=deadline)

    async def stop(self) -> None:
        """Leave now: cancel running turns, hand back everything held, leave the group."""
        await self._shutdown(graceful=False, within=0.0)

    async def _shutdown(self, *, graceful: bool, within: float) -> None:
        if self._state is WorkerState.NEW:
            self._state = WorkerState.STOPPED
            self._stopped.set()
            return
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._do_shutdown(graceful, within))
        elif not graceful:
            # A stop during a drain: cut the wait for running turns short.
            await asyncio.gather(*(p.abandon() for p in list(self._pullers.values())),
                                 return_exceptions=True)
        await asyncio.shield(self._shutdown_task)

    async def _do_shutdown(self, graceful: bool, within: float) -> None:
        self._state = WorkerState.DRAINING
        membership, scheduler = self.membership, self.scheduler
        coordinator, self._coordinator = self._coordinator, None
        if coordinator is not None:
            await cancel_and_wait([coordinator])
        with contextlib.suppress(BusError, OSError):
            await membership.update(draining=True)  # others plan without this worker
        # A partition already being handed back joins that handback.
        pullers = list(self._pullers.values())
        if graceful:
            await asyncio.gather(*(p.release(within=within) for p in pullers),
                                 return_exceptions=True)
        else:
            await asyncio.gather(*(p.abandon() for p in pullers), return_exceptions=True)
        await asyncio.gather(*self._releasing.values(), return_exceptions=True)
        self._pullers.clear()
        self._unlisten()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        await cancel_and_wait([*self._tasks, *self._state_tasks])
        await scheduler.stop()
        if self._completions is not None:
            await self._completions.stop()
        await membership.leave()
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        self._state = WorkerState.STOPPED
        self._stopped.set()
        logger.info("worker %s left group %s (%d envelopes settled)", self.worker_id,
                    self.group, scheduler.completed)

    def _on_signal(self) -> None:
        if self._shutdown_task is None:
            logger.info("worker %s draining on signal", self.worker_id)
            task = asyncio.get_running_loop().create_task(self.drain())
        else:
            logger.info("worker %s stopping on second signal", self.worker_id)
            task = asyncio.get_running_loop().create_task(self.stop())
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    # -- partitions ---------------------------------------------------------

    async def _coordinate(self) -> None:
        membership = self.membership
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.refresh_interval):
                    await membership.changed.wait()
            membership.changed.clear()
            try:
                if membership.lost.is_set():
                    await self._recover_lease()
                else:
                    await self._rebalance()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if isinstance(e, BusError):
                    # The server's answer (a lost lease, no JetStream while a
                    # leader is elected): expected under faults, no traceback.
                    logger.warning("worker %s: rebalancing failed (%s); retrying",
                                   self.worker_id, e)
                else:
                    logger.exception("worker %s: rebalancing failed; retrying", self.worker_id)
                await asyncio.sleep(0.5)
                membership.changed.set()

    async def _rebalance(self) -> None:
        membership = self.membership
        wanted = membership.assigned(self.bus.partitions)
        for p, puller in list(self._pullers.items()):
            if p not in wanted and p not in self._releasing:
                self._releasing[p] = asyncio.create_task(self._release(puller))
        blocked = membership.claimed_elsewhere() | set(self._fenced)
        new = sorted(p for p in wanted if p not in self._pullers and p not in blocked)
        if not new:
            if membership.lease.claims != set(self._pullers):
                # An earlier claim update failed (e.g. a timeout after a release):
                # a stale claim would keep the new owner waiting.
                await membership.update(claims=set(self._pullers))
            return
        await membership.update(claims=set(self._pullers) | set(new))
        started = await asyncio.gather(*(self._start_partition(p) for p in new),
                                       return_exceptions=True)
        failed = {p for p, result in zip(new, started, strict=True)
                  if isinstance(result, BaseException)}
        for p, result in zip(new, started, strict=True):
            if isinstance(result, BaseException):
                logger.warning("worker %s: cannot pull partition %d: %s",
                               self.worker_id, p, result)
        if failed:
            await membership.update(claims=set(self._pullers))
            membership.changed.set()

    async def _start_partition(self, partition: int) -> None:
        puller = PartitionPuller(self.bus, group=self.group, partition=partition,
                                 scheduler=self.scheduler, config=self.config)
        await puller.start()
        self._pullers[partition] = puller

    async def _release(self, puller: PartitionPuller) -> None:
        p = puller.partition
        try:
            await puller.release(within=self.config.handover_timeout)
        finally:
            self._pullers.pop(p, None)
            self._releasing.pop(p, None)
        if self._state is WorkerState.RUNNING:
            with contextlib.suppress(BusError):
                await self.membership.update(claims=set(self._pullers))

    async def _recover_lease(self) -> None:
        logger.warning("worker %s: lease lost; handing back all partitions and rejoining",
                       self.worker_id)
        # Releases under way finish first: cancelling one midway could lose
        # messages a pull had collected.
        await asyncio.gather(*self._releasing.values(), return_exceptions=True)
        await asyncio.gather(*(p.abandon() for p in self._pullers.values()),
                             return_exceptions=True)
        self._pullers.clear()
        self._releasing.clear()
        await self.membership.rejoin()

    # -- fencing ------------------------------------------------------------

    def owns(self, partition: int) -> bool:
        """Whether this worker may still act for ``partition`` (reply, ack) right now.

        False once the partition was given up or fenced, the lease was lost,
        the event loop stalled past :attr:`WorkerConfig.fence_after` (a
        pause: checked here too, as a stale turn may run before the
        watchdog does), or the server has not answered the partition's
        pulls for that long (a cut link). Those cases fence the partition.
        """
        if partition in self._fenced:
            return False
        if self._state not in (WorkerState.RUNNING, WorkerState.DRAINING):
            return False
        puller = self._pullers.get(partition)
        if puller is None or self.membership.lost.is_set():
            return False
        now = asyncio.get_running_loop().time()
        bound = self.config.fence_after
        if now - self._beat > bound:
            self._fence_all(f"its event loop stalled for {now - self._beat:.1f}s")
            return False
        if now - puller.contact > bound:
            self._fence(partition, f"no answer from the server for {now - puller.contact:.1f}s")
            return False
        return True

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        bound = self.config.fence_after
        beat = min(0.25, bound / 6)
        while True:
            await asyncio.sleep(beat)
            now = loop.time()
            if now - self._beat > bound:
                self._fence_all(f"its event loop stalled for {now - self._beat:.1f}s")
            self._beat = now
            for p, puller in list(self._pullers.items()):
                if p not in self._fenced and not puller.releasing and \
                        now - puller.contact > bound:
                    self._fence(p, f"no answer from the server for {now - puller.contact:.1f}s")

    def _fence_all(self, why: str) -> None:
        for p in list(self._pullers):
            self._fence(p, why)
        self._beat = asyncio.get_running_loop().time()

    def _fence(self, partition: int, why: str) -> None:
        """Drop ``partition`` now: no turn starts or settles; running ones are cancelled."""
        puller = self._pullers.get(partition)
        if puller is None or partition in self._fenced:
            return
        logger.warning("worker %s: partition %d fenced (%s): cancelling its turns, "
                       "taking it again from scratch", self.worker_id, partition, why)
        self.scheduler.freeze(partition)
        self._fenced[partition] = asyncio.get_running_loop().create_task(
            self._drop_fenced(puller), name=f"fenced:{puller.consumer}")

    async def _drop_fenced(self, puller: PartitionPuller) -> None:
        p = puller.partition
        try:
            await puller.abandon(unpin_after=False, nak=False)
        finally:
            if self._pullers.get(p) is puller:
                del self._pullers[p]
            self._releasing.pop(p, None)
            self._fenced.pop(p, None)
            if self._membership is not None:
                self._membership.changed.set()  # the coordinator takes it again

    async def _keep_alive(self) -> None:
        interval = self.config.touch_interval
        scheduler = self.scheduler
        while True:
            await asyncio.sleep(interval)
            try:
                await scheduler.touch_due()
            except (NatsError, OSError) as e:
                logger.warning("in_progress sweep failed: %s", e)

    # -- broadcasts ---------------------------------------------------------

    def _on_closed(self, event: ClosedEvent) -> None:
        # The record says the session ended: cancel its turn, settle what is queued.
        self._handles.pop(event.session_id, None)
        if self._scheduler is not None and self._state is WorkerState.RUNNING:
            self._spawn(self._scheduler.close(event.session_id))

    def _on_stale(self) -> None:
        # Closes may have been missed while disconnected: once connected again,
        # read the record of every session held here (confirmed closes cancel).
        if self._scheduler is not None and self.bus.started and self.bus.nc.is_connected:
            self._spawn(self._recheck(self._scheduler.session_ids()))

    async def _recheck(self, session_ids: list[str]) -> None:
        states = self.bus.lifecycle.states
        for sid in session_ids:
            try:
                await states.read(sid)
            except BusError as e:
                logger.warning("could not re-read session %r: %s", sid, e)
                return

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._state_tasks.add(task)
        task.add_done_callback(self._state_tasks.discard)

    def _unlisten(self) -> None:
        states, self._states = self._states, None
        if states is not None:
            states.on_closed(self._on_closed, listen=False)
            states.on_stale(self._on_stale, listen=False)

    async def _on_interrupt(self, msg: Msg) -> None:
        sid = _session_of_ctl(msg.subject)
        if sid is not None and self._scheduler is not None:
            self._scheduler.interrupt(sid)

    # -- turns --------------------------------------------------------------

    async def _execute(self, held: Held, run: Running) -> Outcome:
        admission = await admit(self.bus, held)
        if admission.verdict is Verdict.DEAD:
            return Outcome(Action.DEAD, reason=admission.reason)
        if admission.verdict is Verdict.SETTLE:
            logger.debug("settling seq %d without a turn: %s", held.seq, admission.reason)
            self._settled_closed += 1
            return SKIPPED
        envelope = held.envelope
        assert envelope is not None
        # Skipped envelopes still settle through the scheduler: acked in
        # stream order and remembered for dedupe, like handled ones.
        if envelope.is_expired():
            logger.debug("skipping expired envelope %s of %r", envelope.envelope_id,
                         held.session_id)
            self._skipped += 1
            return SKIPPED
        if self.only_addressed and not envelope.is_for(self.agent):
            self._skipped += 1
            return SKIPPED
        if not self.owns(held.partition):
            # Paused or cut off on the way here (reading the session's state, or
            # the previous turn's completion record): the partition may have
            # moved. Start nothing; the fence hands the envelope back.
            run.cancel_reason = CancelReason.HANDBACK
            raise asyncio.CancelledError
        turn = Turn(bus=self.bus, held=held, group=self.group, agent=self.agent,
                    worker_id=self.worker_id, interrupted=run.interrupted, owns=self.owns,
                    handles=self._session_handle,
                    recent=self._recent if self._recent.enabled else None)
        try:
            await self._handler(turn)
        except Retry as r:
            return self._retry(held, r.delay, r.reason or "handler asked for a retry")
        except Drop as d:
            logger.debug("dropped envelope %s of %r: %s", envelope.envelope_id,
                         held.session_id, d.reason)
            return ACKED
        except DeadLetter as d:
            return Outcome(Action.DEAD, reason=d.reason)
        except Exception as e:
            logger.warning("handler of group %s failed on %r seq %d (attempt %d): %r",
                           self.group, held.session_id, held.seq, held.attempt, e)
            return self._retry(held, None, f"handler raised {e!r}")
        return ACKED

    def _session_handle(self, session_id: str) -> Session:
        # Handles are kept, so a session's record is read once, not once a turn.
        handle = self._handles.get(session_id)
        if handle is None:
            handle = self.bus.session(session_id, participant=self.agent)
            self._handles[session_id] = handle
            if len(self._handles) > _SESSION_HANDLES:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(session_id)
        return handle

    def _retry(self, held: Held, delay: float | None, reason: str) -> Outcome:
        if held.attempt >= self.max_attempts:
            return Outcome(Action.DEAD,
                           reason=f"gave up after {held.attempt} attempts: {reason}")
        if delay is None:
            delay = min(self.config.retry_backoff * 2 ** (held.attempt - 1),
                        self.config.retry_backoff_max)
        return Outcome(Action.RETRY, delay=delay, reason=reason)

    async def _dead_letter(self, held: Held, reason: str) -> None:
        logger.warning("dead-lettering %r seq %d: %s", held.session_id, held.seq, reason)
        await dead_letter(
            self.bus.js, subject=self.bus.names.dead_letter(self.group, held.session_id),
            held=held, group=self.group, reason=reason,
            confirm_within=self.bus.settings.request_timeout,
        )

    def __repr__(self) -> str:
        return (f"<Worker {self.worker_id} group={self.group!r} {self._state.value} "
                f"partitions={len(self._pullers)}>")


def _session_of_ctl(subject: str) -> str | None:
    """The session id in ``<prefix>.ctl.<sid>.<kind>``, None if malformed."""
    parts = subject.split(".")
    if len(parts) != 4:
        return None
    try:
        return decode_token(parts[2])
    except BusError:
        return None
