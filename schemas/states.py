"""Lifecycle states of sessions and of the tasks inside them."""

from __future__ import annotations

from enum import StrEnum


class SessionState(StrEnum):
    """Where a session is in its life. CLOSED and EXPIRED are terminal."""

    PENDING = "pending"
    ACTIVE = "active"
    CLOSED = "closed"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """True for states a session never leaves."""
        return self in TERMINAL_SESSION_STATES


class TaskState(StrEnum):
    """Where a task (a turn queued or running for an agent) is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """True for states a task never leaves."""
        return self in TERMINAL_TASK_STATES


TERMINAL_SESSION_STATES: frozenset[SessionState] = frozenset(
    {SessionState.CLOSED, SessionState.EXPIRED}
)
TERMINAL_TASK_STATES: frozenset[TaskState] = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.EXPIRED}
)
