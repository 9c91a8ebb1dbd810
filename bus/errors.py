"""Every error sessionbus raises, under one root.

::

    BusError
     ├── CodecError (ValueError)                 schemas: wire bytes in or out
     │    ├── EncodeError
     │    └── DecodeError                         .raw
     │         └── CorruptRecord                  .key: a stored record that does not decode
     ├── ConfigError (ValueError)                 bad settings, TTLs, limits
     ├── InvalidIdError (ValueError)              .kind, .value: an id that cannot be used
     ├── InvalidMetrics (ValueError)              .metrics: not a dict of str -> int|float|None
     ├── ConnectionFailed (OSError)               no server, lost server, embedded start failed
     │    ├── AuthenticationFailed                missing, wrong or revoked credentials; TLS refused
     │    └── ServerTooOld                        .version: lacks per-key TTL
     ├── PermissionDenied (PermissionError)      .subject: the user's role may not do this
     ├── BusClosedError                           the bus was used after close()
     ├── BusTimeout (TimeoutError)                the server did not answer in time
     ├── KeyConflict                              .key: a compare-and-set lost to a newer write
     ├── SessionError                             .session_id
     │    ├── SessionNotFound (LookupError)
     │    ├── SessionExists
     │    ├── SessionTerminated                   .state: send into a CLOSED/EXPIRED session
     │    ├── SessionExpired                      a registry record's TTL ran out
     │    ├── EnvelopeTooLarge (ValueError)       .size, .limit
     │    ├── InvalidEnvelope (ValueError)        a send's fields are out of range
     │    ├── DepthLimitExceeded                  .depth, .limit
     │    ├── CausationNotFound (LookupError)     .causation_id
     │    ├── TaskNotFound (LookupError)          .task_id
     │    └── ConcurrentUpdate                    lost a compare-and-set race too often
     ├── LockError                                .session_id
     │    ├── LockTimeout (TimeoutError)
     │    └── LockLost                            the lease ran out while held
     └── WorkerError                              the worker runtime cannot go on

NATS client exceptions are translated at the boundary (``raise ... from e``,
or inside ``with nats_errors("what was being done"):``) so callers catch
these and never ``nats.errors.*``.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator

import nats.errors
import nats.js.errors
from sessionbus.schemas.errors import BusError, CodecError, DecodeError, EncodeError

__all__ = [
    "AuthenticationFailed",
    "BusClosedError",
    "BusError",
    "BusTimeout",
    "CausationNotFound",
    "CodecError",
    "ConcurrentUpdate",
    "ConfigError",
    "ConnectionFailed",
    "CorruptRecord",
    "DecodeError",
    "DepthLimitExceeded",
    "EncodeError",
    "EnvelopeTooLarge",
    "InvalidEnvelope",
    "InvalidIdError",
    "InvalidMetrics",
    "KeyConflict",
    "LockError",
    "LockLost",
    "LockTimeout",
    "PermissionDenied",
    "ServerTooOld",
    "SessionError",
    "SessionExists",
    "SessionExpired",
    "SessionNotFound",
    "SessionTerminated",
    "TaskNotFound",
    "WorkerError",
    "nats_errors",
]


class ConfigError(BusError, ValueError):
    """A setting, TTL or limit is out of range; nothing was sent."""


class InvalidIdError(BusError, ValueError):
    """An id (session, call, node, agent, group) cannot be used.

    ``kind`` names which id it was, ``value`` is what was given.
    """

    def __init__(self, kind: str, value: object, reason: str) -> None:
        self.kind = kind
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid {kind} {shown}: {reason}")


class InvalidMetrics(BusError, ValueError):
    """Registry metrics that are not a dict of str -> int | float | None; nothing was sent.

    ``metrics`` is what was given, ``reason`` says what is wrong with it.
    """

    def __init__(self, metrics: object, reason: str) -> None:
        self.metrics = metrics
        self.reason = reason
        super().__init__(f"invalid metrics: {reason}")


class CorruptRecord(DecodeError):
    """A record stored under ``key`` is not one this code wrote (``raw`` holds its bytes)."""

    def __init__(self, key: str, reason: str, raw: bytes) -> None:
        self.key = key
        super().__init__(f"record {key!r}: {reason}", raw)


class ConnectionFailed(BusError, OSError):
    """The NATS server could not be reached, or the embedded one not started."""


class AuthenticationFailed(ConnectionFailed):
    """The server refused the connection's credentials (or their absence), or its TLS.

    Raised at once by :meth:`SessionBus.start`, not after a reconnect loop;
    the message never holds a secret.
    """


class PermissionDenied(BusError, builtins.PermissionError):
    """The server refused a publish or subscription that the user's role does not allow.

    ``subject`` is the subject it was refused on.
    """

    def __init__(self, subject: str, what: str = "") -> None:
        self.subject = subject
        doing = f"{what}: " if what else ""
        super().__init__(f"{doing}permission denied on {subject!r} (the user's role does not "
                         "allow it; see the README's Security section)")


class ServerTooOld(ConnectionFailed):
    """The server lacks a feature sessionbus needs (per-key TTL: 2.11+)."""

    def __init__(self, version: str, needed: str) -> None:
        self.version = version
        self.needed = needed
        super().__init__(
            f"nats-server {version} is too old: sessionbus needs {needed} or newer "
            "(per-key TTL and TTL markers)"
        )


class BusClosedError(BusError):
    """The bus was used after it was closed, or before it was started."""


class BusTimeout(BusError, builtins.TimeoutError):
    """The server did not answer in time."""


class KeyConflict(BusError):
    """A compare-and-set write found the key at another revision.

    ``key`` is the KV key, ``expected`` the revision the write was based on.
    """

    def __init__(self, key: str, expected: int | None) -> None:
        self.key = key
        self.expected = expected
        super().__init__(f"key {key!r} changed since revision {expected}")


class SessionError(BusError):
    """An error about one session; ``session_id`` names it."""

    def __init__(self, session_id: str, message: str) -> None:
        self.session_id = session_id
        super().__init__(message)


class SessionNotFound(SessionError, LookupError):
    """No such session (never opened, removed, or expired and forgotten)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id, f"session {session_id!r} not found")


class SessionExists(SessionError):
    """A session with this id already exists."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id, f"session {session_id!r} already exists")


class SessionTerminated(SessionError):
    """The session is CLOSED or EXPIRED and accepts nothing more."""

    def __init__(self, session_id: str, state: str) -> None:
        self.state = state
        super().__init__(session_id, f"session {session_id!r} is {state}")


class SessionExpired(SessionError):
    """A registry record's TTL ran out before it was refreshed."""

    def __init__(self, session_id: str, call_id: str | None = None) -> None:
        self.call_id = call_id
        super().__init__(session_id, f"session {session_id!r} expired from the registry")


class EnvelopeTooLarge(SessionError, ValueError):
    """An encoded envelope is over the bus's size limit; it was not sent."""

    def __init__(self, session_id: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            session_id, f"envelope for {session_id!r} is {size} bytes, limit is {limit}"
        )


class InvalidEnvelope(SessionError, ValueError):
    """A send's fields (priority, audience, event type...) are out of range; nothing was sent."""


class DepthLimitExceeded(SessionError):
    """A delegation chain went deeper than the session allows."""

    def __init__(self, session_id: str, depth: int, limit: int) -> None:
        self.depth = depth
        self.limit = limit
        super().__init__(
            session_id, f"delegation depth {depth} exceeds limit {limit} in {session_id!r}"
        )


class CausationNotFound(SessionError, LookupError):
    """A reply names a causation envelope that is not in the session."""

    def __init__(self, session_id: str, causation_id: str) -> None:
        self.causation_id = causation_id
        super().__init__(
            session_id, f"causation envelope {causation_id!r} not found in {session_id!r}"
        )


class TaskNotFound(SessionError, LookupError):
    """A task id that the session's record does not hold."""

    def __init__(self, session_id: str, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(session_id, f"task {task_id!r} not found in session {session_id!r}")


class ConcurrentUpdate(SessionError):
    """A compare-and-set on a session record kept losing to other writers."""

    def __init__(self, session_id: str, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(
            session_id, f"gave up updating {session_id!r} after {attempts} conflicting writes"
        )


class LockError(BusError):
    """An error about a session's cluster-wide turn lock."""

    def __init__(self, session_id: str, message: str) -> None:
        self.session_id = session_id
        super().__init__(message)


class LockTimeout(LockError, builtins.TimeoutError):
    """The turn lock was not obtained in time."""


class LockLost(LockError):
    """The lease behind a held turn lock ran out or was taken over."""


class WorkerError(BusError):
    """An error in the worker runtime."""


@contextlib.contextmanager
def nats_errors(what: str) -> Iterator[None]:
    """Translate nats-py exceptions raised in the block; ``what`` names the operation.

    Lost or closed connections, and nobody answering (no stream takes a
    publish), become :class:`ConnectionFailed`, timeouts
    :class:`BusTimeout`, any other nats error a plain :class:`BusError`.
    sessionbus errors pass through unchanged.
    """
    try:
        yield
    except BusError:
        raise
    except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
            nats.errors.OutboundBufferLimitError, nats.errors.ConnectionDrainingError,
            ConnectionError) as e:
        raise ConnectionFailed(f"{what}: {type(e).__name__} {e}".rstrip()) from e
    except (nats.errors.TimeoutError, builtins.TimeoutError) as e:
        raise BusTimeout(f"{what} timed out") from e
    except nats.errors.Error as e:
        raise BusError(f"{what} failed: {e}") from e
