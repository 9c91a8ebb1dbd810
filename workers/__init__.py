"""sessionbus worker runtime: partitioned, pinned pulls and one turn at a time per session.

Everything a user needs is re-exported here (and from :mod:`sessionbus`);
modules whose names start with an underscore are internal.
"""

from sessionbus.workers._delivery import DEAD_ATTEMPTS_HEADER as DEAD_ATTEMPTS_HEADER
from sessionbus.workers._delivery import DEAD_GROUP_HEADER as DEAD_GROUP_HEADER
from sessionbus.workers._delivery import DEAD_REASON_HEADER as DEAD_REASON_HEADER
from sessionbus.workers._delivery import DEAD_SEQUENCE_HEADER as DEAD_SEQUENCE_HEADER
from sessionbus.workers._delivery import DEAD_SUBJECT_HEADER as DEAD_SUBJECT_HEADER
from sessionbus.workers.config import WorkerConfig as WorkerConfig
from sessionbus.workers.control import DeadLetter as DeadLetter
from sessionbus.workers.control import Drop as Drop
from sessionbus.workers.control import Retry as Retry
from sessionbus.workers.control import TurnControl as TurnControl
from sessionbus.workers.runtime import Handler as Handler
from sessionbus.workers.runtime import Worker as Worker
from sessionbus.workers.runtime import WorkerState as WorkerState
from sessionbus.workers.turn import Turn as Turn

__all__ = [
    # Running a worker
    "Handler",
    "Turn",
    "Worker",
    "WorkerConfig",
    "WorkerState",
    # Steering an envelope's fate from a handler
    "DeadLetter",
    "Drop",
    "Retry",
    "TurnControl",
    # Headers of dead-lettered envelopes
    "DEAD_ATTEMPTS_HEADER",
    "DEAD_GROUP_HEADER",
    "DEAD_REASON_HEADER",
    "DEAD_SEQUENCE_HEADER",
    "DEAD_SUBJECT_HEADER",
]
