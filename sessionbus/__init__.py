"""sessionbus: a session bus for horizontally scaled agent workers, on NATS JetStream.

The one import for the common path::

    from sessionbus import SessionBus, Worker, Turn

:mod:`sessionbus.bus` (the client side), :mod:`sessionbus.workers` (the
worker runtime) and :mod:`sessionbus.schemas` (wire models and codec) hold
the same names and a few more; :mod:`sessionbus.integrations` plugs the bus
into other frameworks.
"""

# Run from the repository's root, this folder comes first on sys.path but
# holds only the application layer: bus/, workers/ and schemas/ sit beside
# it and are mapped into the installed package. extend_path adds the
# installed (or editable) tree of the same package so they resolve.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)


from sessionbus.bus import AuthenticationFailed as AuthenticationFailed
from sessionbus.bus import BusClosedError as BusClosedError
from sessionbus.bus import BusError as BusError
from sessionbus.bus import BusSettings as BusSettings
from sessionbus.bus import BusTimeout as BusTimeout
from sessionbus.bus import CausationNotFound as CausationNotFound
from sessionbus.bus import ClosedEvent as ClosedEvent
from sessionbus.bus import CodecError as CodecError
from sessionbus.bus import ConcurrentUpdate as ConcurrentUpdate
from sessionbus.bus import ConfigError as ConfigError
from sessionbus.bus import ConnectionFailed as ConnectionFailed
from sessionbus.bus import CorruptRecord as CorruptRecord
from sessionbus.bus import DecodeError as DecodeError
from sessionbus.bus import DepthLimitExceeded as DepthLimitExceeded
from sessionbus.bus import EncodeError as EncodeError
from sessionbus.bus import EnvelopeTooLarge as EnvelopeTooLarge
from sessionbus.bus import ExpiredSession as ExpiredSession
from sessionbus.bus import Feed as Feed
from sessionbus.bus import InMemorySessionKVStore as InMemorySessionKVStore
from sessionbus.bus import Interrupt as Interrupt
from sessionbus.bus import InvalidEnvelope as InvalidEnvelope
from sessionbus.bus import InvalidIdError as InvalidIdError
from sessionbus.bus import InvalidMetrics as InvalidMetrics
from sessionbus.bus import KeyConflict as KeyConflict
from sessionbus.bus import LiveFeed as LiveFeed
from sessionbus.bus import LockError as LockError
from sessionbus.bus import LockLost as LockLost
from sessionbus.bus import LockTimeout as LockTimeout
from sessionbus.bus import ManagedSession as ManagedSession
from sessionbus.bus import PermissionDenied as PermissionDenied
from sessionbus.bus import ServerTooOld as ServerTooOld
from sessionbus.bus import Session as Session
from sessionbus.bus import SessionBus as SessionBus
from sessionbus.bus import SessionError as SessionError
from sessionbus.bus import SessionExists as SessionExists
from sessionbus.bus import SessionExpired as SessionExpired
from sessionbus.bus import SessionKVStore as SessionKVStore
from sessionbus.bus import SessionManager as SessionManager
from sessionbus.bus import SessionNotFound as SessionNotFound
from sessionbus.bus import SessionRegistry as SessionRegistry
from sessionbus.bus import SessionStore as SessionStore
from sessionbus.bus import SessionStream as SessionStream
from sessionbus.bus import SessionTerminated as SessionTerminated
from sessionbus.bus import TaskNotFound as TaskNotFound
from sessionbus.bus import TurnLock as TurnLock
from sessionbus.bus import WorkerError as WorkerError
from sessionbus.schemas import EV_DELEGATE as EV_DELEGATE
from sessionbus.schemas import EV_ERROR as EV_ERROR
from sessionbus.schemas import EV_TEXT as EV_TEXT
from sessionbus.schemas import EV_TOOL_CALL as EV_TOOL_CALL
from sessionbus.schemas import EV_TOOL_RESULT as EV_TOOL_RESULT
from sessionbus.schemas import Envelope as Envelope
from sessionbus.schemas import SessionInfo as SessionInfo
from sessionbus.schemas import SessionMetadata as SessionMetadata
from sessionbus.schemas import SessionState as SessionState
from sessionbus.schemas import TaskInfo as TaskInfo
from sessionbus.schemas import TaskState as TaskState
from sessionbus.workers import DeadLetter as DeadLetter
from sessionbus.workers import Drop as Drop
from sessionbus.workers import Handler as Handler
from sessionbus.workers import Retry as Retry
from sessionbus.workers import Turn as Turn
from sessionbus.workers import TurnControl as TurnControl
from sessionbus.workers import Worker as Worker
from sessionbus.workers import WorkerConfig as WorkerConfig
from sessionbus.workers import WorkerState as WorkerState

__all__ = [
    # The bus and its settings
    "BusSettings",
    "SessionBus",
    # Sessions
    "ClosedEvent",
    "Feed",
    "Interrupt",
    "LiveFeed",
    "Session",
    # Workers
    "DeadLetter",
    "Drop",
    "Handler",
    "Retry",
    "Turn",
    "TurnControl",
    "Worker",
    "WorkerConfig",
    "WorkerState",
    # Wire models
    "EV_DELEGATE",
    "EV_ERROR",
    "EV_TEXT",
    "EV_TOOL_CALL",
    "EV_TOOL_RESULT",
    "Envelope",
    "SessionInfo",
    "SessionMetadata",
    "SessionState",
    "TaskInfo",
    "TaskState",
    # Seed-compatible facades
    "ExpiredSession",
    "InMemorySessionKVStore",
    "ManagedSession",
    "SessionKVStore",
    "SessionManager",
    "SessionRegistry",
    "SessionStore",
    "SessionStream",
    "TurnLock",
    # Errors
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
]
