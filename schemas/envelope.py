"""The envelope: one message posted into a session."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections import deque
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sessionbus.schemas.events import EV_TEXT

#: Upper bound for priorities; 0 is the default, higher runs first.
MAX_PRIORITY = 9


#: Ids made from one read of the operating system's random source.
_ID_BATCH = 64
#: Ids made and not handed out yet (one ``popleft`` each: safe across threads).
_fresh_ids: deque[str] = deque()
# A forked child must not hand out the ids its parent may still hand out.
os.register_at_fork(after_in_child=_fresh_ids.clear)


def new_envelope_id() -> str:
    """A fresh, globally unique envelope id: a random UUID (version 4), 32 hex characters.

    As ``uuid.uuid4().hex``, from the same source, but one read of it
    makes 64 ids: a send made one system call for its id alone.
    """
    try:
        return _fresh_ids.popleft()
    except IndexError:
        pass
    raw = bytearray(os.urandom(16 * _ID_BATCH))
    for i in range(0, len(raw), 16):
        raw[i + 6] = raw[i + 6] & 0x0F | 0x40  # version 4
        raw[i + 8] = raw[i + 8] & 0x3F | 0x80  # the RFC 4122 variant
    text = raw.hex()
    _fresh_ids.extend([text[i:i + 32] for i in range(32, len(text), 32)])
    return text[:32]


_IDEMPOTENCY_NS = uuid.UUID("6f1c3c3e-4b0a-4c55-9a53-2f4f0c3f6a11")
_IDEMPOTENCY_NS_BYTES = _IDEMPOTENCY_NS.bytes
_sha1 = hashlib.sha1


def idempotent_envelope_id(session_id: str, idempotency_key: str) -> str:
    """The envelope id a send with ``idempotency_key`` always gets.

    Deriving the id from the key means a retried send carries the same
    ``Nats-Msg-Id`` and is stored once, and the caller gets the same id back.
    It is ``uuid.uuid5(namespace, f"{session_id}\\x00{idempotency_key}").hex``,
    computed without building the UUID objects (a worker derives one per
    reply).
    """
    name = f"{session_id}\x00{idempotency_key}".encode()
    digest = bytearray(_sha1(_IDEMPOTENCY_NS_BYTES + name, usedforsecurity=False).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50  # version 5
    digest[8] = digest[8] & 0x3F | 0x80  # the RFC 4122 variant
    return digest.hex()


class Envelope(BaseModel):
    """One message posted into a session.

    ``audience=None`` means every participant of the session except the
    sender. ``depth`` counts delegation hops; the bus sets it from the
    causation envelope rather than trusting the sender.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    envelope_id: str = Field(default_factory=new_envelope_id, min_length=1, max_length=128)
    session_id: str = Field(min_length=1)
    sender_id: str = Field(default="", max_length=1024)
    audience: tuple[str, ...] | None = None
    event_type: str = Field(default=EV_TEXT, min_length=1, max_length=256)
    event_data: dict[str, Any] = Field(default_factory=dict)
    causation_id: str | None = None
    trace_id: str | None = None
    depth: int = Field(default=0, ge=0)
    created_at: float = Field(default_factory=time.time)
    idempotency_key: str | None = Field(default=None, max_length=1024)
    ttl_seconds: float | None = Field(default=None, gt=0)
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY)

    @field_validator("audience", mode="before")
    @classmethod
    def _audience_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        return value

    @property
    def content(self) -> str:
        """The text body of an ``EV_TEXT`` envelope, or ``""``."""
        text = self.event_data.get("text", "")
        return text if isinstance(text, str) else str(text)

    def is_for(self, participant: str) -> bool:
        """Whether ``participant`` is among the envelope's recipients."""
        if self.audience is None:
            return participant != self.sender_id
        return participant in self.audience

    def is_expired(self, now: float | None = None) -> bool:
        """Whether ``ttl_seconds`` has passed since ``created_at``."""
        if self.ttl_seconds is None:
            return False
        return (time.time() if now is None else now) >= self.created_at + self.ttl_seconds
