"""The agent ``sessionbus demo`` runs in its worker processes.

Each demo envelope carries its index in the session (``event_data["i"]``)
and a think time. The agent "thinks" (sleeps) that long, then reports the
turn on its token stream (``turn.stream``): a small record with the index,
the delivery attempt, the worker, and when the turn started and ended. The
demo collects those records from every worker and checks from them that
each session's envelopes were handled in send order, one turn at a time.

It lives in the package (not in ``examples/``) so that an installed
sessionbus can run the demo from any directory::

    sessionbus worker sessionbus._demo_agent:handle --group demo
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from sessionbus.schemas import DecodeError, decode_map, encode
from sessionbus.workers import Turn

__all__ = ["DEMO_EVENT", "DEMO_GROUP", "TurnRecord", "demo_event_data", "handle"]

#: The worker group the demo's agents form.
DEMO_GROUP = "demo"
#: Event type of the envelopes the demo sends.
DEMO_EVENT = "demo.step"
#: Longest think time accepted from an envelope, in milliseconds.
MAX_THINK_MS = 10_000


def demo_event_data(index: int, *, think_ms: float) -> dict[str, Any]:
    """The ``event_data`` of the demo's ``index``-th envelope in a session."""
    return {"i": index, "think_ms": think_ms}


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """What the agent reports about one turn it ran."""

    session_id: str
    index: int
    attempt: int
    worker_id: str
    started: float
    ended: float

    def to_wire(self) -> bytes:
        """Encode for the token stream."""
        return encode({"sid": self.session_id, "i": self.index, "attempt": self.attempt,
                       "worker": self.worker_id, "started": self.started,
                       "ended": self.ended})

    @classmethod
    def from_wire(cls, raw: bytes) -> TurnRecord:
        """Decode; :class:`~sessionbus.schemas.DecodeError` if it is not a turn record."""
        body = decode_map(raw)
        try:
            record = cls(str(body["sid"]), int(body["i"]), int(body["attempt"]),
                         str(body["worker"]), float(body["started"]), float(body["ended"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DecodeError(f"not a demo turn record: {e}", raw) from e
        return record


async def handle(turn: Turn) -> None:
    """Think for the envelope's think time, then report the turn."""
    envelope = turn.envelope
    # Only demo steps are work (the worker already skips what is not for us).
    if envelope.event_type != DEMO_EVENT:
        return
    started = time.time()
    index = envelope.event_data.get("i")
    think_ms = envelope.event_data.get("think_ms", 0)
    if not isinstance(index, int):
        return
    if isinstance(think_ms, int | float) and 0 < think_ms <= MAX_THINK_MS:
        await asyncio.sleep(think_ms / 1000)
    record = TurnRecord(turn.session_id, index, turn.attempt, turn.worker_id, started,
                        time.time())
    await turn.stream(record.to_wire())
