"""Wire models and codec of sessionbus. Imports nothing else of ours."""

from schemas.codec import FORMAT_VERSION as FORMAT_VERSION
from schemas.codec import decode as decode
from schemas.codec import decode_map as decode_map
from schemas.codec import encode as encode
from schemas.envelope import MAX_PRIORITY as MAX_PRIORITY
from schemas.envelope import Envelope as Envelope
from schemas.envelope import idempotent_envelope_id as idempotent_envelope_id
from schemas.envelope import new_envelope_id as new_envelope_id
from schemas.errors import BusError as BusError
from schemas.errors import CodecError as CodecError
from schemas.errors import DecodeError as DecodeError
from schemas.errors import EncodeError as EncodeError
from schemas.events import CONTROL_EVENTS as CONTROL_EVENTS
from schemas.events import EV_DELEGATE as EV_DELEGATE
from schemas.events import EV_ERROR as EV_ERROR
from schemas.events import EV_INTERRUPT as EV_INTERRUPT
from schemas.events import EV_SESSION_CLOSED as EV_SESSION_CLOSED
from schemas.events import EV_SESSION_EXPIRED as EV_SESSION_EXPIRED
from schemas.events import EV_SESSION_OPENED as EV_SESSION_OPENED
from schemas.events import EV_TEXT as EV_TEXT
from schemas.events import EV_TOOL_CALL as EV_TOOL_CALL
from schemas.events import EV_TOOL_RESULT as EV_TOOL_RESULT
from schemas.session import MetricValue as MetricValue
from schemas.session import SessionInfo as SessionInfo
from schemas.session import SessionMetadata as SessionMetadata
from schemas.session import TaskInfo as TaskInfo
from schemas.states import TERMINAL_SESSION_STATES as TERMINAL_SESSION_STATES
from schemas.states import TERMINAL_TASK_STATES as TERMINAL_TASK_STATES
from schemas.states import SessionState as SessionState
from schemas.states import TaskState as TaskState

__all__ = [
    "CONTROL_EVENTS",
    "EV_DELEGATE",
    "EV_ERROR",
    "EV_INTERRUPT",
    "EV_SESSION_CLOSED",
    "EV_SESSION_EXPIRED",
    "EV_SESSION_OPENED",
    "EV_TEXT",
    "EV_TOOL_CALL",
    "EV_TOOL_RESULT",
    "FORMAT_VERSION",
    "MAX_PRIORITY",
    "TERMINAL_SESSION_STATES",
    "TERMINAL_TASK_STATES",
    "BusError",
    "CodecError",
    "DecodeError",
    "EncodeError",
    "Envelope",
    "MetricValue",
    "SessionInfo",
    "SessionMetadata",
    "SessionState",
    "TaskInfo",
    "TaskState",
    "decode",
    "decode_map",
    "encode",
    "idempotent_envelope_id",
    "new_envelope_id",
]
