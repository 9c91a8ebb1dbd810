"""The close event: how a session ended, as announced on ``names.closed(sid)``.

When a session moves to CLOSED or EXPIRED, the one process whose
compare-and-set made the change publishes a :class:`ClosedEvent` on
``names.closed(sid)`` (core NATS: every node hears it in about a
millisecond, leaf nodes included, nothing is stored). It is a hint: every
process confirms it against the session record before acting on it (see
:mod:`sessionbus.bus._states`), so anyone able to publish on the subject
can cost a read, never a close.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sessionbus.schemas import DecodeError, SessionMetadata, SessionState, decode_map, encode

__all__ = ["ClosedEvent"]


@dataclass(frozen=True, slots=True)
class ClosedEvent:
    """A session was closed or expired, as broadcast on ``names.closed(sid)``.

    On the wire it is the codec's msgpack map ``{session_id, state, reason,
    at, revision}``; ``revision`` is the terminal record's revision in KV
    (0 if unknown).
    """

    session_id: str
    state: SessionState
    reason: str
    at: float
    revision: int = 0

    @classmethod
    def of(cls, meta: SessionMetadata, *, revision: int = 0) -> ClosedEvent:
        """The event announcing a terminal record."""
        return cls(meta.session_id, meta.state, meta.close_reason,
                   meta.closed_at or time.time(), revision)

    def to_wire(self) -> bytes:
        """Encode for the broadcast."""
        return encode({"session_id": self.session_id, "state": self.state.value,
                       "reason": self.reason, "at": self.at, "revision": self.revision})

    @classmethod
    def from_wire(cls, raw: bytes) -> ClosedEvent:
        """Decode a broadcast; :class:`~sessionbus.schemas.DecodeError` if it is not one."""
        body = decode_map(raw)
        try:
            session_id, reason, at = body["session_id"], body.get("reason", ""), body["at"]
            revision = body.get("revision", 0)
            state = SessionState(body["state"])
        except (KeyError, ValueError) as e:
            raise DecodeError(f"not a close event: {e}", raw) from e
        if not (isinstance(session_id, str) and isinstance(reason, str)
                and isinstance(at, int | float) and isinstance(revision, int)
                and state.is_terminal):
            raise DecodeError("close event fields have the wrong types", raw)
        return cls(session_id, state, reason, float(at), revision)
