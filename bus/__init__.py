"""sessionbus client side."""

from bus.closures import ClosedEvent as ClosedEvent
from bus.closures import CloseListener as CloseListener
from bus.core import MIN_SERVER_VERSION as MIN_SERVER_VERSION
from bus.core import SessionBus as SessionBus
from bus.errors import BusClosedError as BusClosedError
from bus.errors import BusError as BusError
from bus.errors import BusTimeout as BusTimeout
from bus.errors import CausationNotFound as CausationNotFound
from bus.errors import CodecError as CodecError
from bus.errors import ConcurrentUpdate as ConcurrentUpdate
from bus.errors import ConfigError as ConfigError
from bus.errors import ConnectionFailed as ConnectionFailed
from bus.errors import CorruptRecord as CorruptRecord
from bus.errors import DecodeError as DecodeError
from bus.errors import DepthLimitExceeded as DepthLimitExceeded
from bus.errors import EncodeError as EncodeError
from bus.errors import EnvelopeTooLarge as EnvelopeTooLarge
from bus.errors import HandlerError as HandlerError
from bus.errors import InvalidEnvelope as InvalidEnvelope
from bus.errors import InvalidIdError as InvalidIdError
from bus.errors import InvalidMetrics as InvalidMetrics
from bus.errors import KeyConflict as KeyConflict
from bus.errors import LockError as LockError
from bus.errors import LockLost as LockLost
from bus.errors import LockTimeout as LockTimeout
from bus.errors import ServerTooOld as ServerTooOld
from bus.errors import SessionError as SessionError
from bus.errors import SessionExists as SessionExists
from bus.errors import SessionExpired as SessionExpired
from bus.errors import SessionNotFound as SessionNotFound
from bus.errors import SessionTerminated as SessionTerminated
from bus.errors import TaskNotFound as TaskNotFound
from bus.errors import WorkerError as WorkerError
from bus.errors import nats_errors as nats_errors
from bus.expiry import ExpiryWatcher as ExpiryWatcher
from bus.feeds import Feed as Feed
from bus.feeds import QueueFeed as QueueFeed
from bus.history import LiveFeed as LiveFeed
from bus.history import find_depth as find_depth
from bus.history import replay_envelopes as replay_envelopes
from bus.history import replay_messages as replay_messages
from bus.kv import Bucket as Bucket
from bus.kv import KVEntry as KVEntry
from bus.kv import KVEvent as KVEvent
from bus.kv import KVOp as KVOp
from bus.kv import wire_ttl as wire_ttl
from bus.lifecycle import IDLE_REASON as IDLE_REASON
from bus.lifecycle import Lifecycle as Lifecycle
from bus.lifecycle import task_id_for as task_id_for
from bus.lock import LockState as LockState
from bus.lock import TurnLock as TurnLock
from bus.lock import read_lock as read_lock
from bus.manager import ManagedSession as ManagedSession
from bus.manager import SessionManager as SessionManager
from bus.names import Names as Names
from bus.registry import ExpiredSession as ExpiredSession
from bus.registry import SessionRegistry as SessionRegistry
from bus.registry_store import InMemorySessionKVStore as InMemorySessionKVStore
from bus.registry_store import SessionKVStore as SessionKVStore
from bus.server import BINARY_ENV as BINARY_ENV
from bus.server import NatsCluster as NatsCluster
from bus.server import NatsServer as NatsServer
from bus.server import find_server_binary as find_server_binary
from bus.server import free_port as free_port
from bus.server import server_version as server_version
from bus.session import Interrupt as Interrupt
from bus.session import Session as Session
from bus.session import open_session as open_session
from bus.settings import BusSettings as BusSettings
from bus.store import SessionStore as SessionStore
from bus.store import SessionStream as SessionStream
from schemas import EV_TEXT as EV_TEXT
from schemas import Envelope as Envelope
from schemas import SessionInfo as SessionInfo
from schemas import SessionMetadata as SessionMetadata
from schemas import SessionState as SessionState
from schemas import TaskInfo as TaskInfo
from schemas import TaskState as TaskState

__all__ = [
    "BINARY_ENV",
    "EV_TEXT",
    "IDLE_REASON",
    "MIN_SERVER_VERSION",
    "Bucket",
    "BusClosedError",
    "BusError",
    "BusSettings",
    "BusTimeout",
    "CausationNotFound",
    "CloseListener",
    "ClosedEvent",
    "CodecError",
    "ConcurrentUpdate",
    "ConfigError",
    "ConnectionFailed",
    "CorruptRecord",
    "DecodeError",
    "DepthLimitExceeded",
    "EncodeError",
    "Envelope",
    "EnvelopeTooLarge",
    "ExpiredSession",
    "ExpiryWatcher",
    "Feed",
    "HandlerError",
    "InMemorySessionKVStore",
    "Interrupt",
    "InvalidEnvelope",
    "InvalidIdError",
    "InvalidMetrics",
    "KVEntry",
    "KVEvent",
    "KVOp",
    "KeyConflict",
    "Lifecycle",
    "LiveFeed",
    "LockError",
    "LockLost",
    "LockState",
    "LockTimeout",
    "ManagedSession",
    "Names",
    "NatsCluster",
    "NatsServer",
    "QueueFeed",
    "ServerTooOld",
    "Session",
    "SessionBus",
    "SessionError",
    "SessionExists",
    "SessionExpired",
    "SessionInfo",
    "SessionKVStore",
    "SessionManager",
    "SessionMetadata",
    "SessionNotFound",
    "SessionRegistry",
    "SessionState",
    "SessionStore",
    "SessionStream",
    "SessionTerminated",
    "TaskInfo",
    "TaskNotFound",
    "TaskState",
    "TurnLock",
    "WorkerError",
    "find_depth",
    "find_server_binary",
    "free_port",
    "nats_errors",
    "open_session",
    "read_lock",
    "replay_envelopes",
    "replay_messages",
    "server_version",
    "task_id_for",
    "wire_ttl",
]
