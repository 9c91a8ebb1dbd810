"""Records kept about sessions: registry info and session metadata."""

from __future__ import annotations

import time
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field
from sessionbus.schemas.states import SessionState, TaskState

MetricValue = int | float | None


class SessionInfo(BaseModel):
    """A session as the node registry sees it: which node hosts it, its metrics.

    Mirrors the registry record of multi-node agent launchers; unknown keys
    in stored records are ignored so older readers keep working.
    """

    model_config = ConfigDict(extra="ignore")

    session_id: str
    call_id: str
    node_id: str
    started_at: float
    metrics_updated_at: float
    metrics: dict[str, MetricValue] = Field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a mapping, silently ignoring unknown keys."""
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping of the record's fields."""
        return self.model_dump()


class TaskInfo(BaseModel):
    """A unit of work in a session: one turn, queued or running, for one agent."""

    model_config = ConfigDict(extra="ignore")

    task_id: str
    agent: str = ""
    envelope_id: str | None = None
    state: TaskState = TaskState.QUEUED
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    def is_terminal(self) -> bool:
        """True once the task can no longer change state."""
        return self.state.is_terminal


class SessionMetadata(BaseModel):
    """The lifecycle record of a session, shared by every node.

    ``ttl_seconds`` is the idle timeout: a session with no activity for that
    long expires. ``max_depth`` bounds delegation hops inside the session.
    """

    model_config = ConfigDict(extra="ignore")

    session_id: str
    state: SessionState = SessionState.ACTIVE
    participants: list[str] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    closed_at: float | None = None
    close_reason: str = ""
    ttl_seconds: float | None = None
    max_depth: int = 8
    metadata: dict[str, Any] = Field(default_factory=dict)
    tasks: dict[str, TaskInfo] = Field(default_factory=dict)
    agents_streaming: list[str] = Field(default_factory=list)

    def is_terminal(self) -> bool:
        """True once the session is CLOSED or EXPIRED."""
        return self.state.is_terminal

    def terminated(self, state: SessionState, reason: str, now: float | None = None) -> Self:
        """A copy moved to terminal ``state``, cascading EXPIRED to open tasks."""
        at = time.time() if now is None else now
        tasks = {
            tid: task
            if task.is_terminal()
            else task.model_copy(update={"state": TaskState.EXPIRED, "updated_at": at})
            for tid, task in self.tasks.items()
        }
        return self.model_copy(
            update={
                "state": state,
                "closed_at": at,
                "updated_at": at,
                "close_reason": reason,
                "tasks": tasks,
                "agents_streaming": [],
            }
        )
