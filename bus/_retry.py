"""Pacing requests that no replica answered, up to a deadline.

When a replicated stream's leader is lost, the other replicas stop
answering Direct Gets for a while (about 1.5 s on loopback), and nothing
takes a write until a new leader is elected (5-7 s after a SIGKILL on
loopback): "no responders". A Direct Get in flight to the node that died
is never answered at all.

Reads wait both out (each attempt bounded by :data:`READ_ATTEMPT`
seconds) instead of failing. Writes, bucket writes and envelope sends
alike, are sent again after "no responders" (:meth:`Retry.resend`). One
that got no answer at all may have been stored: only writes that can
tell their own stored copy from another's send it again, up to
:data:`UNANSWERED_WRITES` attempts in all (:class:`Unanswered`): an
envelope (the stream knows its ``Nats-Msg-Id`` as a duplicate), any
bucket write with an id of its own (``bus/_kv.py``), a new session's
record, a change of a session's record (a close), a joining worker's
lease.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sessionbus.bus.errors import BusError, BusTimeout, ConnectionFailed

__all__ = ["LAST_ATTEMPT", "READ_ATTEMPT", "UNANSWERED_WRITES", "Retry", "Unanswered"]

logger = logging.getLogger(__name__)

#: Seconds one read attempt waits before it is retried (Direct Gets answer in
#: well under a millisecond when a replica is there to answer).
READ_ATTEMPT = 1.0
#: Seconds a request sent again is given at least to be answered (a leader
#: answers in well under a millisecond on loopback).
LAST_ATTEMPT = 0.1
#: Attempts at a write that knows its own stored record, each of which may go
#: unanswered, before it raises BusTimeout.
UNANSWERED_WRITES = 3


class Unanswered:
    """The attempts of one such write that got no answer (see :data:`UNANSWERED_WRITES`)."""

    def __init__(self, what: str) -> None:
        self.count = 0
        self._what = what

    def again(self, e: BusTimeout) -> None:
        """Note one more unanswered attempt: raise ``e`` at the bound, else log the next one."""
        self.count += 1
        if self.count >= UNANSWERED_WRITES:
            raise e
        logger.warning("%s got no answer; writing it again", self._what)


class Retry:
    """The retries of one request: 20 ms apart at first, doubling up to 250 ms."""

    def __init__(self, within: float) -> None:
        self._deadline = time.monotonic() + within
        self._delay = 0.02
        self._unanswered = False

    def attempt_timeout(self) -> float:
        """How long the next read attempt may wait for its answer."""
        return max(0.001, min(READ_ATTEMPT, self.left()))

    def left(self) -> float:
        """Seconds to the deadline (0 once past)."""
        return max(0.0, self._deadline - time.monotonic())

    def error(self, cause: BaseException, what: str) -> BusError:
        """The error to raise once retries are exhausted.

        ConnectionFailed if any attempt found nobody answering, else BusTimeout.
        """
        if self._unanswered or not isinstance(cause, TimeoutError):
            return ConnectionFailed(f"{what}: no JetStream answering")
        return BusTimeout(f"{what} timed out")

    async def again(self, cause: BaseException) -> bool:
        """Sleep before the next attempt; False once the deadline has passed."""
        if not isinstance(cause, TimeoutError):
            self._unanswered = True
        left = self.left()
        if left <= 0:
            return False
        await asyncio.sleep(min(self._delay, left))
        self._delay = min(self._delay * 2, 0.25)
        return True

    async def resend(self, cause: BaseException) -> float | None:
        """Sleep before sending again what nobody answered.

        Returns how long the resend may wait for its answer (what is left of
        the time, at least :data:`LAST_ATTEMPT`), or None when that is up.
        """
        if not await self.again(cause):
            return None
        left = self.left()
        return left if left >= LAST_ATTEMPT else None
