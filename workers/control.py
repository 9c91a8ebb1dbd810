"""Control flow a handler raises to steer its envelope, separate from errors.

A handler that returns has handled its envelope: it is acked. A handler
that raises an ordinary exception has failed: the envelope is retried with
backoff, later envelopes of the session waiting behind it, until the
worker's ``max_attempts``, then dead-lettered. These exceptions say
something else on purpose::

    async def handle(turn: Turn) -> None:
        if not ready():
            raise Retry(delay=5.0)          # run this envelope again later
        if turn.envelope.event_type == "noise":
            raise Drop("not for us")        # ack it, never run it again
        if not valid(turn.envelope):
            raise DeadLetter("bad payload")  # park it with the reason, ack it

They derive from :class:`TurnControl`, not from :class:`sessionbus.bus.BusError`, so
an ``except BusError`` in a handler never swallows them and a failing
handler is never mistaken for one that asked for a retry.
"""

from __future__ import annotations

from sessionbus.bus.errors import ConfigError

__all__ = ["DeadLetter", "Drop", "Retry", "TurnControl"]


class TurnControl(Exception):
    """Base of the exceptions a handler raises to decide its envelope's fate."""


class Retry(TurnControl):
    """Run this envelope again after ``delay`` seconds (None: the worker's backoff).

    The session's later envelopes wait, so order is kept. A retry counts
    as an attempt: past the worker's ``max_attempts`` the envelope is
    dead-lettered with the reason ``retries exhausted``.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None and not delay >= 0:
            raise ConfigError(f"Retry delay must be >= 0 seconds, got {delay!r}")
        self.delay = delay
        self.reason = reason
        super().__init__(reason or f"retry after {delay}s")


class Drop(TurnControl):
    """Ack this envelope without running it again; ``reason`` is logged."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(reason or "dropped")


class DeadLetter(TurnControl):
    """Send this envelope to the group's dead-letter subject with ``reason``, then ack it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
