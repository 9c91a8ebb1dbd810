"""Event type constants carried in :attr:`Envelope.event_type`.

They are plain strings so that applications can add their own; the bus
only gives meaning to the ones listed in :data:`CONTROL_EVENTS`.
"""

from __future__ import annotations

EV_TEXT = "text"
EV_TOOL_CALL = "tool_call"
EV_TOOL_RESULT = "tool_result"
EV_DELEGATE = "delegate"
EV_ERROR = "error"
EV_SESSION_OPENED = "session.opened"
EV_SESSION_CLOSED = "session.closed"
EV_SESSION_EXPIRED = "session.expired"
EV_INTERRUPT = "session.interrupt"

#: Events the bus itself emits on a session's control subjects.
CONTROL_EVENTS: frozenset[str] = frozenset(
    {EV_SESSION_OPENED, EV_SESSION_CLOSED, EV_SESSION_EXPIRED, EV_INTERRUPT}
)
