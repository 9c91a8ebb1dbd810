"""sessionbus worker runtime: partitioned, pinned pulls and one turn at a time per session."""

from workers.config import WorkerConfig as WorkerConfig
from workers.control import DeadLetter as DeadLetter
from workers.control import Drop as Drop
from workers.control import Retry as Retry
from workers.control import TurnControl as TurnControl
from workers.delivery import DEAD_ATTEMPTS_HEADER as DEAD_ATTEMPTS_HEADER
from workers.delivery import DEAD_GROUP_HEADER as DEAD_GROUP_HEADER
from workers.delivery import DEAD_REASON_HEADER as DEAD_REASON_HEADER
from workers.delivery import DEAD_SEQUENCE_HEADER as DEAD_SEQUENCE_HEADER
from workers.delivery import DEAD_SUBJECT_HEADER as DEAD_SUBJECT_HEADER
from workers.delivery import Held as Held
from workers.membership import Lease as Lease
from workers.membership import Membership as Membership
from workers.membership import assign as assign
from workers.partition import PartitionPuller as PartitionPuller
from workers.runtime import Handler as Handler
from workers.runtime import Worker as Worker
from workers.runtime import WorkerState as WorkerState
from workers.scheduler import Scheduler as Scheduler
from workers.turn import Turn as Turn

__all__ = [
    "DEAD_ATTEMPTS_HEADER",
    "DEAD_GROUP_HEADER",
    "DEAD_REASON_HEADER",
    "DEAD_SEQUENCE_HEADER",
    "DEAD_SUBJECT_HEADER",
    "DeadLetter",
    "Drop",
    "Handler",
    "Held",
    "Lease",
    "Membership",
    "PartitionPuller",
    "Retry",
    "Scheduler",
    "Turn",
    "TurnControl",
    "Worker",
    "WorkerConfig",
    "WorkerState",
    "assign",
]
