"""One partition's puller: the pinned consumer this worker pulls while it owns it.

Pull pacing. An idle partition has one pull request waiting (``batch=1``,
``poll_interval``), so an envelope into an idle session reaches its
handler at once; after one arrives, short bursts (``fetch_batch``, a few
milliseconds) take what is queued, until a burst comes back short. At the
worker's soft cap (``max_held``) and while handing back, only keep-alive
pulls go out: at most one message every ``poll_interval / 2``, which keeps
the pin (the server moves it after ``priority_timeout`` without a pull
request, even while a pull waits).

Handing a partition back (:meth:`PartitionPuller.release`), in this order:

1. start no new turn on it, keep pulling only to hold the pin;
2. let its running turns finish (``handover_timeout``, then cancel them);
3. stop pulling and collect what earlier pulls still deliver, until a pull
   ends with the server's own status (nothing of ours is in flight);
4. nak everything held, in stream order, the last nak confirmed;
5. unpin, so the next owner (which waits for this worker's claim to go) is
   pinned at once and gets the nak'd envelopes first, in order.

The claim in the lease is dropped by the caller after that.

Taking a partition over (on start, and again after the pin moved away and
back), no turn starts until the previous owner's envelopes are in hand:
nats-server does not redeliver them in stream order (its redelivery queue
comes out rotated when a puller that is not yet pinned was waiting), so a
session's later envelope can arrive before an earlier one. Redeliveries go
out before any new message, and the timing rules make every envelope of a
dead or paused owner due before its pin lapses; so once a pull brings a
first-time delivery, or a one-message pull comes back empty while pinned,
everything redelivered is held, sorted per session, and turns may start
(:attr:`catching_up`). Catching up pulls past ``max_held`` if need be: what
a previous owner left unacked is at most ``max_ack_pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from sessionbus.bus._jsapi import (
    ConsumerNotFoundError,
    PinnedPuller,
    ack_numbers,
    create_pinned_consumer,
    unpin,
)
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusError
from sessionbus.workers._delivery import nak_in_order
from sessionbus.workers._scheduler import Scheduler
from sessionbus.workers.config import WorkerConfig

__all__ = ["PartitionPuller", "recovery_pause"]

logger = logging.getLogger(__name__)

#: Expiry of a burst pull: long enough for the server to answer with what it has.
_BURST_EXPIRES = 0.005
#: Grace after a pull's expiry before nothing more of it can arrive.
_LATE_GRACE = 0.5
#: Expiry of the one-message pulls that probe for redeliveries while catching up.
_CATCH_UP_PROBE = 0.25
#: Pulls made to collect in-flight deliveries before handing back.
_DRAIN_PULLS = 20
#: Seconds before the second attempt in a row to recreate a partition's consumer
#: (doubling up to ``_RECOVER_MAX``): while a replicated consumer elects a
#: leader its create succeeds at once and its pulls keep failing.
_RECOVER_FIRST = 0.05
_RECOVER_MAX = 1.0


def recovery_pause(attempt: int) -> float:
    """Seconds to wait before attempt number ``attempt`` (1, 2, ...) in a row to recreate."""
    if attempt <= 1:
        return 0.0
    # The exponent is capped first: 2.0 ** 1024 does not fit in a float.
    return min(_RECOVER_MAX, _RECOVER_FIRST * 2.0 ** min(attempt - 2, 16))


class PartitionPuller:
    """Pulls one partition's pinned consumer and feeds the scheduler."""

    def __init__(
        self, bus: SessionBus, *, group: str, partition: int, scheduler: Scheduler,
        config: WorkerConfig,
    ) -> None:
        self.partition = partition
        self._bus = bus
        self._group = group
        self._scheduler = scheduler
        self._config = config
        names = bus.names
        self._stream = names.envelope_stream
        self._consumer = names.worker_consumer(group, partition)
        self._priority_group = names.worker_priority_group
        self._puller: PinnedPuller | None = None
        self._task: asyncio.Task[None] | None = None
        self._finishing: asyncio.Task[None] | None = None
        self._keepalive = False
        self._stopping = False
        self._catching_up = False
        self._wake = asyncio.Event()
        # Loop time before which a pull that the client stopped waiting for
        # may still deliver messages to the inbox.
        self._in_flight_until = 0.0
        # Loop time from which the messages of the latest pull count their age.
        self._requested_at = 0.0
        # Consumer recoveries since the server last answered a pull.
        self._recoveries = 0
        self.contact = 0.0
        """Loop time of the server's last answer to a pull (messages or a status)."""

    @property
    def consumer(self) -> str:
        """Durable name of the partition's consumer for this group."""
        return self._consumer

    @property
    def pinned(self) -> bool:
        """Whether the server last told this puller it holds the pin."""
        return self._puller is not None and self._puller.pinned

    @property
    def catching_up(self) -> bool:
        """Whether turns wait until the previous owner's envelopes are all redelivered here."""
        return self._catching_up

    @property
    def releasing(self) -> bool:
        """Whether the partition is being handed back."""
        return self._keepalive

    async def start(self) -> None:
        """Create (or bind) the consumer and start pulling."""
        await self._ensure_consumer()
        self._puller = PinnedPuller(
            self._bus.nc, stream=self._stream, consumer=self._consumer,
            group=self._priority_group, api_prefix=self._bus.api_prefix, headers=False,
        )
        await self._puller.start()
        self.contact = asyncio.get_running_loop().time()
        self._begin_catch_up()
        self._scheduler.on_room(self._wake)
        self._task = asyncio.create_task(self._loop(), name=f"pull:{self._consumer}")

    async def _ensure_consumer(self) -> None:
        cfg = self._config
        await create_pinned_consumer(
            self._bus.nc, stream=self._stream, name=self._consumer,
            filter_subject=self._bus.names.partition_filter(self.partition),
            group=self._priority_group, ack_wait=cfg.ack_wait,
            priority_timeout=cfg.priority_timeout, max_ack_pending=cfg.max_ack_pending,
            api_prefix=self._bus.api_prefix,
        )

    # -- pulling ------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self._config
        keep_expires = cfg.poll_interval / 2
        last_request = 0.0
        burst = False
        while not self._stopping:
            keep = self._keepalive
            grant = ask = 0
            if not keep:
                if self._catching_up:
                    # Past max_held if need be: the catch-up must see every
                    # redelivery (at most max_ack_pending) before a turn starts.
                    ask = cfg.fetch_batch if burst else 1
                else:
                    grant = ask = self._scheduler.reserve(cfg.fetch_batch if burst else 1)
                keep = ask == 0
            try:
                if keep:
                    pause = last_request + keep_expires - loop.time()
                    if pause > 0:
                        if await self._sleep(pause):
                            break
                        if not self._keepalive and self._scheduler.room() > 0:
                            continue  # room freed up: pull normally
                        if last_request + keep_expires > loop.time():
                            continue  # others took the room first: the pin needs no pull yet
                    last_request = loop.time()
                    msgs = await self._fetch(1, keep_expires)
                    burst = False
                elif burst:
                    last_request = loop.time()
                    msgs = await self._fetch(ask, _BURST_EXPIRES)
                    burst = len(msgs) >= ask
                else:
                    last_request = loop.time()
                    # Catching up, an empty answer is what ends it: ask briefly.
                    msgs = await self._fetch(
                        1, _CATCH_UP_PROBE if self._catching_up else cfg.poll_interval)
                    burst = bool(msgs)
                if msgs:
                    await self._scheduler.offer(self.partition, msgs,
                                                requested_at=self._requested_at)
                if self._catching_up:
                    self._check_caught_up(msgs, asked=ask or 1)
                if msgs:
                    await asyncio.sleep(0)  # let the turns just queued start before pulling on
            except ConsumerNotFoundError as e:
                await self._recover_consumer(e)
                continue
            except (BusError, NatsError, OSError) as e:
                logger.warning("partition %d: pull failed: %s", self.partition, e)
                await self._sleep(min(1.0, cfg.poll_interval))
                continue
            finally:
                self._scheduler.unreserve(grant)
            assert self._puller is not None
            status = self._puller.last_status
            if status is not None and status.code == 423:
                await self._pin_lost()

    def _begin_catch_up(self) -> None:
        if not self._catching_up:
            self._catching_up = True
            self._scheduler.freeze(self.partition)

    def _check_caught_up(self, msgs: list[Msg], *, asked: int) -> None:
        """End the catch-up once nothing redelivered can still be ahead of what is held."""
        assert self._puller is not None
        status = self._puller.last_status
        if msgs:
            # A first delivery comes only once the redelivery queue is empty.
            # (A burst that comes back short proves nothing: the server may
            # end it on its expiry while it still has redeliveries to send.)
            done = any(_first_delivery(m) for m in msgs)
        else:
            # Nothing at all for a one-message pull the server ended, while
            # this puller holds the pin: nothing was waiting for it. (Without
            # the pin, another holder may still have them.)
            done = (asked == 1 and self._puller.pinned and status is not None
                    and status.code in (404, 408))
        if done:
            self._catching_up = False
            self._scheduler.unfreeze(self.partition)

    async def _fetch(self, batch: int, expires: float) -> list[Msg]:
        assert self._puller is not None
        sent = asyncio.get_running_loop().time()
        # The server starts a message's ack timer when it sends it: no earlier
        # than this request, or than an earlier one that may still deliver.
        # (Such a pull was sent at most poll_interval + grace before the time
        # it may deliver until.) With none in flight, ages count from now.
        self._requested_at = sent
        if self._in_flight_until > sent:
            self._requested_at = min(
                sent, self._in_flight_until - self._config.poll_interval - _LATE_GRACE)
        try:
            msgs = await self._puller.fetch(batch, expires)
        except BaseException:
            self._in_flight_until = max(self._in_flight_until, sent + expires + _LATE_GRACE)
            raise
        if self._puller.last_status is None and len(msgs) < batch:
            # The client gave up before the server's status: the pull may live on.
            self._in_flight_until = max(self._in_flight_until, sent + expires + _LATE_GRACE)
        if msgs or self._puller.last_status is not None:
            self.contact = asyncio.get_running_loop().time()
            self._recoveries = 0
        return msgs

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` (room freeing up does not end it); True if stopping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._stopping and (left := deadline - loop.time()) > 0:
            await self._sleep(left)
        return self._stopping

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early when stopping or when room frees up; True if stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        if not self._stopping:
            self._wake.clear()
        return self._stopping

    async def _pin_lost(self) -> None:
        # Another puller holds the pin: the server delivers to it now. What
        # this worker holds goes back at once, in order, so that owner gets
        # it before anything newer of the same sessions.
        logger.warning("partition %d: the pin moved away; handing back what is held",
                       self.partition)
        sched = self._scheduler
        sched.freeze(self.partition)
        await sched.cancel_partition(self.partition)
        await nak_in_order(self._bus.nc, sched.take_partition(self.partition))
        # Stay frozen: if the pin comes back here, catch up first again.
        self._catching_up = True

    async def _recover_consumer(self, cause: ConsumerNotFoundError) -> None:
        self._recoveries += 1
        why = f"{cause.code} {cause.description}".strip()
        if self._recoveries == 1:
            logger.error("partition %d: a pull of consumer %s got %s: the consumer is gone, "
                         "or has no leader; recreating it (what was held is dropped, the "
                         "consumer redelivers it)", self.partition, self._consumer, why)
        else:
            # Still no answer to a pull: a replicated consumer without a
            # leader is "recreated" at once and fails again; wait it out.
            pause = recovery_pause(self._recoveries)
            logger.debug("partition %d: consumer %s still not answering (a pull got %s, "
                         "attempt %d); recreating it in %.2fs", self.partition, self._consumer,
                         why, self._recoveries, pause)
            if await self._pause(pause):
                return
        sched = self._scheduler
        sched.freeze(self.partition)
        await sched.cancel_partition(self.partition)
        sched.take_partition(self.partition)
        self._catching_up = True  # the new consumer redelivers: catch up before turns
        try:
            await self._ensure_consumer()
        except (BusError, NatsError, OSError) as e:
            logger.warning("partition %d: cannot recreate consumer: %s", self.partition, e)
            await self._sleep(1.0)

    # -- handing back -------------------------------------------------------

    async def release(self, *, within: float) -> None:
        """Hand the partition back gracefully: finish running turns, nak the rest, unpin.

        Joins a handback already under way instead of starting a second one.
        """
        if self._finishing is None:
            self._finishing = asyncio.create_task(self._release(within),
                                                  name=f"release:{self._consumer}")
        await asyncio.shield(self._finishing)

    async def abandon(self, *, unpin_after: bool = True, nak: bool = True) -> None:
        """Hand the partition back now: cancel running turns, nak everything held.

        During a graceful release, cuts its wait for running turns short.
        ``nak=False`` (a fenced worker, which may no longer own what it
        holds) answers nothing and lets the server's timers redeliver.
        """
        if self._finishing is None:
            self._finishing = asyncio.create_task(self._abandon(unpin_after, nak),
                                                  name=f"abandon:{self._consumer}")
        else:
            await self._scheduler.cancel_partition(self.partition)
        await asyncio.shield(self._finishing)

    async def _release(self, within: float) -> None:
        self._keepalive = True
        self._catching_up = False
        self._scheduler.freeze(self.partition)
        if not await self._scheduler.wait_idle(self.partition, within):
            logger.warning("partition %d: turns still running after %.1fs; cancelling them",
                           self.partition, within)
            await self._scheduler.cancel_partition(self.partition)
        await self._hand_back(unpin_after=True)

    async def _abandon(self, unpin_after: bool, nak: bool) -> None:
        self._keepalive = True
        self._catching_up = False
        self._scheduler.freeze(self.partition)
        await self._scheduler.cancel_partition(self.partition)
        await self._hand_back(unpin_after=unpin_after, nak=nak)

    async def _hand_back(self, *, unpin_after: bool, nak: bool = True) -> None:
        await self._stop_loop()
        if nak:
            await self._collect_in_flight()
        sched = self._scheduler
        await sched.cancel_partition(self.partition)
        held = sched.take_partition(self.partition)
        if nak:
            await nak_in_order(self._bus.nc, held)
        if unpin_after and self._puller is not None and self._puller.pinned:
            try:
                await unpin(self._bus.nc, stream=self._stream, consumer=self._consumer,
                            group=self._priority_group, api_prefix=self._bus.api_prefix)
            except (BusError, NatsError, OSError) as e:
                # The pin then lapses after priority_timeout: slower, still in order.
                logger.warning("partition %d: unpin failed: %s", self.partition, e)
        if self._puller is not None:
            with contextlib.suppress(BusError, NatsError, OSError):
                await self._puller.stop()
        sched.unfreeze(self.partition)
        sched.on_room(self._wake, listen=False)
        logger.debug("partition %d handed back (%d envelopes nak'd)", self.partition, len(held))

    async def _stop_loop(self) -> None:
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            # Never cancel a pull midway: messages it collected would be
            # neither held nor handed back, and come back out of order.
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _collect_in_flight(self) -> None:
        puller = self._puller
        if puller is None:
            return
        loop = asyncio.get_running_loop()
        late = self._in_flight_until - loop.time()
        if late > 0:
            await asyncio.sleep(late)
        batch = self._config.fetch_batch
        for _ in range(_DRAIN_PULLS):
            try:
                msgs = await puller.fetch(batch, _BURST_EXPIRES)
            except (BusError, NatsError, OSError):
                return
            if msgs:
                await self._scheduler.offer(self.partition, msgs)
            if puller.last_status is not None and len(msgs) < batch:
                return

    def __repr__(self) -> str:
        state = "releasing" if self._keepalive else "pulling"
        return f"<PartitionPuller {self._consumer} {state} pinned={self.pinned}>"


def _first_delivery(msg: Msg) -> bool:
    numbers = ack_numbers(msg.reply)
    return numbers is not None and numbers.delivered == 1
