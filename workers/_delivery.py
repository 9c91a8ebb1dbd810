"""A message the worker holds, and what it can answer the server about it.

Every envelope pulled from a partition is *held* until the worker acks it
(handled, dropped, dead-lettered) or naks it (handed back to the next
owner). While held it gets an ``in_progress`` before ``ack_wait`` runs out,
queued or running alike, or the server would redeliver it behind the
worker's back. Answers are published straight to the message's reply
subject (one core publish each, framed without nats-py's per-call checks:
the server wrote that subject; no per-message state in nats-py), so a
redelivered copy can replace the original without "already acked" errors.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import Error as JsError
from sessionbus.bus._rawpub import publish, publish_nowait
from sessionbus.bus.errors import BusError, DecodeError, WorkerError
from sessionbus.schemas import Envelope

__all__ = [
    "DEAD_ATTEMPTS_HEADER",
    "DEAD_GROUP_HEADER",
    "DEAD_REASON_HEADER",
    "DEAD_SEQUENCE_HEADER",
    "DEAD_SUBJECT_HEADER",
    "Held",
]

logger = logging.getLogger(__name__)

#: Header of a dead-lettered envelope: why it was parked.
DEAD_REASON_HEADER = "Sb-Dead-Reason"
#: Header: the worker group that gave up on it.
DEAD_GROUP_HEADER = "Sb-Dead-Group"
#: Header: attempts made (deliveries plus local retries).
DEAD_ATTEMPTS_HEADER = "Sb-Dead-Attempts"
#: Header: its sequence in the envelope stream.
DEAD_SEQUENCE_HEADER = "Sb-Dead-Stream-Seq"
#: Header: the subject it was stored under.
DEAD_SUBJECT_HEADER = "Sb-Dead-Subject"

_ACK = b"+ACK"
_NAK = b"-NAK"
_WPI = b"+WPI"
_MAX_HEADER_VALUE = 1024


@dataclass(slots=True, eq=False)
class Held:
    """One envelope this worker holds: queued behind its session's turn, or running."""

    seq: int
    """Sequence in the envelope stream: the order of the session's envelopes."""
    partition: int
    session_id: str
    msg: Msg
    """The latest delivery (a redelivered copy replaces the original)."""
    envelope: Envelope | None
    error: DecodeError | None
    delivered: int
    """The server's delivery count of the latest delivery."""
    touched: float
    """Loop time of the delivery or of the last ``in_progress``."""
    failures: int = field(default=0)
    """Handler failures and retries in this worker since it was delivered."""

    @property
    def attempt(self) -> int:
        """This delivery's attempt number: server deliveries plus local retries."""
        return self.delivered + self.failures

    @property
    def priority(self) -> int:
        """The envelope's priority (0 for one that did not decode)."""
        return self.envelope.priority if self.envelope is not None else 0


async def ack(nc: Client, held: Held) -> None:
    """Acknowledge: the server forgets the message."""
    await publish(nc, held.msg.reply, _ACK)


def ack_nowait(nc: Client, held: Held) -> Coroutine[Any, Any, None] | None:
    """:func:`ack` queued without a coroutine: the flush to await, if any (``publish_nowait``)."""
    return publish_nowait(nc, held.msg.reply, _ACK)


async def touch(nc: Client, held: Held, now: float) -> None:
    """Send ``in_progress`` so the server restarts the message's ``ack_wait``."""
    await publish(nc, held.msg.reply, _WPI)
    held.touched = now


async def nak(nc: Client, held: Held) -> None:
    """Hand the message back for immediate redelivery (to whoever holds the pin)."""
    await publish(nc, held.msg.reply, _NAK)


async def nak_in_order(nc: Client, held: list[Held], *, confirm_within: float = 2.0) -> None:
    """Nak ``held`` in stream order and wait until the server has processed them.

    The server queues naks in arrival order and redelivers in that order,
    so the next owner gets each session's envelopes in sequence. The last
    nak is a request: its reply means every earlier one was processed, so
    the caller may move the pin right after.
    """
    ordered = sorted(held, key=lambda h: h.seq)
    if not ordered:
        return
    for h in ordered[:-1]:
        await nc.publish(h.msg.reply, _NAK)
    try:
        await nc.request(ordered[-1].msg.reply, _NAK, timeout=confirm_within)
    except (NatsError, TimeoutError, BusError) as e:  # BusError: PermissionDenied
        logger.warning("nak of %d messages not confirmed: %s", len(ordered), e)


async def dead_letter(
    js: JetStreamContext, *, subject: str, held: Held, group: str, reason: str,
    confirm_within: float = 5.0,
) -> None:
    """Store the envelope's raw bytes on ``subject`` with the reason in headers.

    Published through JetStream (awaiting the stream's ack) with a message
    id derived from the group and stream sequence, so a retried dead-letter
    is stored once. Raises WorkerError if the stream did not confirm.
    """
    group_hash = hashlib.blake2b(group.encode(), digest_size=8).hexdigest()
    headers = {
        DEAD_REASON_HEADER: _header_value(reason),
        DEAD_GROUP_HEADER: _header_value(group),
        DEAD_ATTEMPTS_HEADER: str(held.attempt),
        DEAD_SEQUENCE_HEADER: str(held.seq),
        DEAD_SUBJECT_HEADER: held.msg.subject,
        "Nats-Msg-Id": f"dead:{group_hash}:{held.seq}",
    }
    try:
        await js.publish(subject, held.msg.data, headers=headers, timeout=confirm_within)
    except (NatsError, JsError, TimeoutError) as e:
        raise WorkerError(f"dead-letter of stream sequence {held.seq} failed: {e}") from e


def _header_value(text: str) -> str:
    # Header values are one line; keep them short and printable.
    flat = " ".join(text.split())
    return flat[:_MAX_HEADER_VALUE] or "-"
