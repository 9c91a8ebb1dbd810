"""Whether a held envelope may run: the checks a worker makes before each turn.

The bus enforces here what a well-behaved client already does, so that a
raw publish, a stale client or a forged field cannot get a turn run:

* the subject token must be the canonical encoding of a session id (the
  scheduler marks it malformed otherwise), and the envelope's
  ``session_id`` must name that session;
* the session must exist, and be active according to its record (asked of
  the bus's :class:`~sessionbus.bus._states.SessionStates`: from memory for
  a session known active, one read on first sight, after a hint or a
  reconnect). Envelopes of a CLOSED or EXPIRED session are settled without
  a turn, whenever they arrive;
* its delegation depth must be at least its causation's depth + 1 (a
  sender may raise it, never lower it) and within the session's
  ``max_depth``. The causation's depth is the one this worker noted when
  that envelope passed here (a session's envelopes reach one worker in
  order); only after a failover or a restart is the history read, once.

Refused envelopes go to the dead-letter stream with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sessionbus.bus._history import find_depth
from sessionbus.bus.core import SessionBus
from sessionbus.workers._delivery import Held

__all__ = ["Admission", "Verdict", "admit"]


class Verdict(StrEnum):
    """What to do with a held envelope before running anything."""

    RUN = "run"
    SETTLE = "settle"
    """Ack without a turn: the session ended."""
    DEAD = "dead"
    """Dead-letter with the reason."""


@dataclass(frozen=True, slots=True)
class Admission:
    """A verdict and, unless RUN, why."""

    verdict: Verdict
    reason: str = ""


RUN = Admission(Verdict.RUN)


def _stored_at(held: Held) -> float:
    """Wall-clock time the server stored the envelope."""
    return held.msg.metadata.timestamp.timestamp()


async def admit(bus: SessionBus, held: Held) -> Admission:
    """Check ``held`` against its session's record and its causation (see the module doc)."""
    if held.error is not None:
        return Admission(Verdict.DEAD, f"malformed envelope: {held.error}")
    envelope = held.envelope
    assert envelope is not None
    sid = held.session_id
    if envelope.session_id != sid:
        return Admission(Verdict.DEAD, f"the envelope names session {envelope.session_id!r} "
                                       f"but was sent into {sid!r}")
    states = bus.lifecycle.states
    known = states.fresh(sid)
    if known is None or not known.active:  # the hot path needs no await
        known = await states.admit(sid, lambda: _stored_at(held))
    meta = known.meta
    if meta is None:
        return Admission(Verdict.DEAD, f"session {sid!r} does not exist")
    if meta.is_terminal():
        return Admission(Verdict.SETTLE, f"session {sid!r} is {meta.state.value}")
    if envelope.depth > meta.max_depth:
        return Admission(Verdict.DEAD, f"depth {envelope.depth} is over the session's "
                                       f"max_depth {meta.max_depth}")
    if envelope.causation_id is not None:
        parent = states.known_depth(sid, envelope.causation_id)
        if parent is None:
            parent = await find_depth(bus, sid, envelope.causation_id, stored=held.seq)
        if parent is None:
            return Admission(Verdict.DEAD, f"causation {envelope.causation_id!r} is not "
                                           f"in session {sid!r}")
        if envelope.depth < parent + 1:
            return Admission(Verdict.DEAD, f"depth {envelope.depth} is below its causation's "
                                           f"depth + 1 ({parent + 1})")
    states.remember(envelope)
    return RUN
