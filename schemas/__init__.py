"""Wire models and codec of sessionbus. Imports nothing else of ours."""

from sessionbus.schemas.codec import FORMAT_VERSION as FORMAT_VERSION
from sessionbus.schemas.codec import decode as decode
from sessionbus.schemas.codec import decode_map as decode_map
from sessionbus.schemas.codec import encode as encode
from sessionbus.schemas.envelope import MAX_PRIORITY as MAX_PRIORITY
from sessionbus.schemas.envelope import Envelope as Envelope
from sessionbus.schemas.envelope import idempotent_envelope_id as idempotent_envelope_id
from sessionbus.schemas.envelope import new_envelope_id as new_envelope_id
from sessionbus.schemas.errors import BusError as BusError
from sessionbus.schemas.errors import CodecError as CodecError
from sessionbus.schemas.errors import DecodeError as DecodeError
from sessionbus.schemas.errors import EncodeError as EncodeError
from sessionbus.schemas.events import EV_DELEGATE as EV_DELEGATE
from sessionbus.schemas.events import EV_ERROR as EV_ERROR
from sessionbus.schemas.events import EV_TEXT as EV_TEXT
from sessionbus.schemas.events import EV_TOOL_CALL as EV_TOOL_CALL
from sessionbus.schemas.events import EV_TOOL_RESULT as EV_TOOL_RESULT
from sessionbus.schemas.session import MetricValue as MetricValue
from sessionbus.schemas.session import SessionInfo as SessionInfo
from sessionbus.schemas.session import SessionMetadata as SessionMetadata
from sessionbus.schemas.session import TaskInfo as TaskInfo
from sessionbus.schemas.states import TERMINAL_SESSION_STATES as TERMINAL_SESSION_STATES
from sessionbus.schemas.states import TERMINAL_TASK_STATES as TERMINAL_TASK_STATES
from sessionbus.schemas.states import SessionState as SessionState
from sessionbus.schemas.states import TaskState as TaskState

__all__ = [
    "EV_DELEGATE",
    "EV_ERROR",
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
