"""How a turn ends: the verdict on its envelope, and why it was cancelled.

The runtime turns a handler's return or exception into an :class:`Outcome`;
the scheduler carries it out. A running turn is a :class:`Running`, which
records why it was cancelled before cancelling it, so the scheduler knows
whether to ack its envelope (interrupt, close) or keep it for the next
owner (handback).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum

from sessionbus.workers._delivery import Held


class Action(StrEnum):
    """What to do with an envelope once its turn is over."""

    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A turn's verdict: the action, a retry delay, and a reason for logs and dead letters."""

    action: Action
    delay: float = 0.0
    reason: str = ""
    #: Whether a handler ran: only then does settling write a completion record.
    ran: bool = True


ACKED = Outcome(Action.ACK)
#: Settled without a handler (a closed session, an expired or unaddressed envelope).
SKIPPED = Outcome(Action.ACK, ran=False)

class CancelReason(StrEnum):
    """Why a running turn was cancelled."""

    INTERRUPT = "interrupt"
    CLOSE = "close"
    HANDBACK = "handback"


class Running:
    """A turn in progress: its held envelope, task and interrupt flag."""

    __slots__ = ("cancel_reason", "finished", "held", "interrupted", "started", "task")

    def __init__(self, held: Held) -> None:
        self.held = held
        self.interrupted = asyncio.Event()
        self.cancel_reason: CancelReason | None = None
        #: Set once the handler returned: from then on only settling is left,
        #: which is never cancelled by an interrupt or a close.
        self.finished = False
        #: Set when the task begins: a task cancelled before that would never
        #: run its cleanup, so such a cancel is only recorded (the turn checks it).
        self.started = False
        self.task: asyncio.Task[None] | None = None

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the handler for ``reason``; False if it already finished."""
        if self.finished or self.task is None or self.cancel_reason is not None:
            return False
        self.cancel_reason = reason
        self.interrupted.set()
        if self.started:
            self.task.cancel()
        return True
