"""Event type constants carried in :attr:`Envelope.event_type`.

They are plain strings so that applications can add their own; the bus
gives none of them a meaning of its own.
"""

from __future__ import annotations

EV_TEXT = "text"
EV_TOOL_CALL = "tool_call"
EV_TOOL_RESULT = "tool_result"
EV_DELEGATE = "delegate"
EV_ERROR = "error"
