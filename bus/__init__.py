"""sessionbus client side: the bus, sessions, and the seed-compatible facades.

Everything a user needs is re-exported here (and from :mod:`sessionbus`);
modules whose names start with an underscore are internal.
"""

from sessionbus.bus._closures import ClosedEvent as ClosedEvent
from sessionbus.bus._feeds import Feed as Feed
from sessionbus.bus._history import LiveFeed as LiveFeed
from sessionbus.bus._lock import TurnLock as TurnLock
from sessionbus.bus.core import SessionBus as SessionBus
from sessionbus.bus.errors import AuthenticationFailed as AuthenticationFailed
from sessionbus.bus.errors import BusClosedError as BusClosedError
from sessionbus.bus.errors import BusError as BusError
from sessionbus.bus.errors import BusTimeout as BusTimeout
from sessionbus.bus.errors import CausationNotFound as CausationNotFound
from sessionbus.bus.errors import CodecError as CodecError
from sessionbus.bus.errors import ConcurrentUpdate as ConcurrentUpdate
from sessionbus.bus.errors import ConfigError as ConfigError
from sessionbus.bus.errors import ConnectionFailed as ConnectionFailed
from sessionbus.bus.errors import CorruptRecord as CorruptRecord
from sessionbus.bus.errors import DecodeError as DecodeError
from sessionbus.bus.errors import DepthLimitExceeded as DepthLimitExceeded
from sessionbus.bus.errors import EncodeError as EncodeError
from sessionbus.bus.errors import EnvelopeTooLarge as EnvelopeTooLarge
from sessionbus.bus.errors import InvalidEnvelope as InvalidEnvelope
from sessionbus.bus.errors import InvalidIdError as InvalidIdError
from sessionbus.bus.errors import InvalidMetrics as InvalidMetrics
from sessionbus.bus.errors import KeyConflict as KeyConflict
from sessionbus.bus.errors import LockError as LockError
from sessionbus.bus.errors import LockLost as LockLost
from sessionbus.bus.errors import LockTimeout as LockTimeout
from sessionbus.bus.errors import PermissionDenied as PermissionDenied
from sessionbus.bus.errors import ServerTooOld as ServerTooOld
from sessionbus.bus.errors import SessionError as SessionError
from sessionbus.bus.errors import SessionExists as SessionExists
from sessionbus.bus.errors import SessionExpired as SessionExpired
from sessionbus.bus.errors import SessionNotFound as SessionNotFound
from sessionbus.bus.errors import SessionTerminated as SessionTerminated
from sessionbus.bus.errors import TaskNotFound as TaskNotFound
from sessionbus.bus.errors import WorkerError as WorkerError
from sessionbus.bus.manager import ManagedSession as ManagedSession
from sessionbus.bus.manager import SessionManager as SessionManager
from sessionbus.bus.registry import ExpiredSession as ExpiredSession
from sessionbus.bus.registry import SessionRegistry as SessionRegistry
from sessionbus.bus.registry_store import InMemorySessionKVStore as InMemorySessionKVStore
from sessionbus.bus.registry_store import SessionKVStore as SessionKVStore
from sessionbus.bus.session import Interrupt as Interrupt
from sessionbus.bus.session import Session as Session
from sessionbus.bus.settings import BusSettings as BusSettings
from sessionbus.bus.store import SessionStore as SessionStore
from sessionbus.bus.store import SessionStream as SessionStream

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
