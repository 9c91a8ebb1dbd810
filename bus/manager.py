"""SessionManager: agentopera's session lifecycle manager, on the bus.

The page's ``SessionManager`` kept sessions in a repository in one process
and cancelled streaming agents through its runtime. Here the bus is both:
every session is a bus session whose record
(:class:`~sessionbus.schemas.SessionMetadata`, in the sessions bucket) holds its
participants and the agents streaming in it, always changed with
compare-and-set. Two managers in two processes therefore see one truth,
and an interrupt is the session's transient signal on
``names.interrupt(sid)``, heard by every node.

Sessions started here get an idle TTL of ``session_timeout_minutes``: the
bus's expiry watcher (started by :meth:`SessionManager.start`) expires them
when their idle timer runs out, and :meth:`SessionManager.expire_old_sessions`
sweeps for any whose timer ran out while no watcher was up.

The page's ``Session`` model is :class:`ManagedSession` here (also
importable as ``sessionbus.bus.manager.Session``): ``sessionbus.bus.Session`` is the
per-participant handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Self

from pydantic import BaseModel, Field
from sessionbus.bus._names import validate_id
from sessionbus.bus.errors import (
    BusError,
    ConfigError,
    KeyConflict,
    SessionExists,
    SessionNotFound,
    SessionTerminated,
    nats_errors,
)
from sessionbus.bus.session import Session as SessionHandle
from sessionbus.schemas import SessionMetadata, SessionState, decode, encode

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

# ``Session`` (the seed's name for the model) and ``replace_session`` (shared
# with the store) are importable from here but not re-exported from ``bus``.
__all__ = ["ManagedSession", "SessionManager"]

logger = logging.getLogger(__name__)

#: ``close_reason`` of a session ended by :meth:`SessionManager.end_session`.
ENDED_REASON = "ended"
#: ``close_reason`` of a session closed by :meth:`SessionManager.start_new_session`.
REPLACED_REASON = "replaced"
#: ``reason`` of the interrupt :meth:`SessionManager.interrupt_streaming_agents` sends.
INTERRUPT_REASON = "interrupt_streaming_agents"
_REPLACE_ATTEMPTS = 25


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class ManagedSession(BaseModel):
    """A session as the manager reports it (agentopera's ``Session`` model).

    A snapshot of the session's record: changing it changes nothing on the
    bus; the manager's methods do. ``agents`` are the session's
    participants, ``state`` where the session is in its life.
    """

    session_id: str
    start_time: datetime = Field(default_factory=_utcnow)
    last_updated: datetime = Field(default_factory=_utcnow)
    agents_streaming: set[str] = Field(default_factory=set)
    agents: set[str] = Field(default_factory=set)
    state: SessionState = SessionState.ACTIVE

    @classmethod
    def from_metadata(cls, meta: SessionMetadata) -> Self:
        """The snapshot of a session record."""
        return cls(
            session_id=meta.session_id,
            start_time=_at(meta.created_at),
            last_updated=_at(meta.updated_at),
            agents_streaming=set(meta.agents_streaming),
            agents=set(meta.participants),
            state=meta.state,
        )

    def touch(self) -> None:
        """Update last active time."""
        self.last_updated = _utcnow()

    def mark_agent_streaming(self, agent_id: str) -> None:
        """Mark an agent as currently streaming."""
        self.agents_streaming.add(agent_id)
        self.touch()

    def unmark_agent_streaming(self, agent_id: str) -> None:
        """Unmark an agent from live-streaming mode."""
        self.agents_streaming.discard(agent_id)
        self.touch()

    def end_session(self) -> None:
        """Mark the session as complete."""
        self.state = SessionState.CLOSED
        self.agents_streaming.clear()
        self.touch()

    @property
    def is_active(self) -> bool:
        """Whether the session has not ended."""
        return not self.state.is_terminal


#: The seed's name for the model (``sessionbus.bus.Session`` is the session handle).
Session = ManagedSession


async def replace_session(
    bus: SessionBus,
    session_id: str,
    *,
    ttl: float | None,
    reason: str = REPLACED_REASON,
    participants: list[str] | None = None,
) -> SessionMetadata:
    """Start ``session_id`` afresh: close what is there, drop its history, write a new record.

    A live session is closed first with ``reason`` (broadcast as usual).
    The new record is written with compare-and-set over the old one, so
    when several processes replace the same session at once one record
    wins and the others return it. ``ttl`` is the new session's idle TTL
    (None: no idle expiry).
    """
    lifecycle, names, kv = bus.lifecycle, bus.names, bus.sessions_kv
    old = await lifecycle.load(session_id)
    if old is not None and not old.is_terminal():
        await lifecycle.terminate(session_id, SessionState.CLOSED, reason)
    started = time.time()
    with nats_errors(f"dropping the history of {session_id!r}"):
        await bus.js.purge_stream(names.envelope_stream, subject=names.history_filter(session_id))
    ttl_s = ttl
    meta = SessionMetadata(
        session_id=session_id, state=SessionState.ACTIVE, participants=list(participants or ()),
        created_at=started, updated_at=started, ttl_seconds=ttl_s,
        max_depth=bus.settings.max_depth,
    )
    key = names.session_key(session_id)
    for _ in range(_REPLACE_ATTEMPTS):
        with nats_errors(f"reading session {session_id!r}"):
            entry = await kv.get(key)
        try:
            with nats_errors(f"replacing session {session_id!r}"):
                if entry is None:
                    revision = await kv.create(key, encode(meta))
                else:
                    current = decode(entry.value, SessionMetadata)
                    if not current.is_terminal() and current.created_at >= started:
                        return current  # replaced by someone else meanwhile
                    if not current.is_terminal():
                        # Re-opened by someone between our close and now.
                        await lifecycle.terminate(session_id, SessionState.CLOSED, reason)
                        continue
                    revision = await kv.update(key, encode(meta), last=entry.revision)
        except KeyConflict:
            continue
        await lifecycle.states.announce_opened(meta, revision)
        break
    else:
        raise SessionExists(session_id)
    if ttl_s is not None:
        await lifecycle.start_expiry_watcher()
        await lifecycle.refresh_timer(session_id, ttl_s, force=True)
    return meta


class SessionManager:
    """Session lifecycle with a background expiry task, over a started bus.

    ``SessionManager(bus, session_timeout_minutes=30, cleanup_interval_sec=60)``;
    :meth:`start` runs the expiry sweep every ``cleanup_interval_sec``
    seconds until :meth:`shutdown`. Agent ids are strings.
    """

    def __init__(
        self,
        bus: SessionBus,
        *,
        session_timeout_minutes: float = 30,
        cleanup_interval_sec: float = 60,
    ) -> None:
        if isinstance(session_timeout_minutes, bool) or not (
            isinstance(session_timeout_minutes, int | float) and session_timeout_minutes > 0
        ):
            raise ConfigError(
                f"session_timeout_minutes must be > 0, got {session_timeout_minutes!r}"
            )
        if isinstance(cleanup_interval_sec, bool) or not (
            isinstance(cleanup_interval_sec, int | float) and cleanup_interval_sec > 0
        ):
            raise ConfigError(f"cleanup_interval_sec must be > 0, got {cleanup_interval_sec!r}")
        self.bus = bus
        self.session_timeout = float(session_timeout_minutes) * 60.0
        self.cleanup_interval = float(cleanup_interval_sec)
        self._task: asyncio.Task[None] | None = None

    # -- background task -------------------------------------------------------

    async def start(self) -> None:
        """Starts the session manager background task (and the bus's expiry watcher)."""
        if self._task is not None:
            return
        await self.bus.start_lifecycle()
        self._task = asyncio.create_task(self._cleanup_loop(), name="session-manager-cleanup")

    async def shutdown(self) -> None:
        """Gracefully stops the background task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval)
            try:
                expired = await self.expire_old_sessions()
            except BusError as e:
                logger.warning("session expiry sweep failed: %s", e)
                continue
            if expired:
                logger.info("expired %d idle session(s)", len(expired))

    # -- sessions --------------------------------------------------------------

    async def start_session(self, session_id: str) -> ManagedSession:
        """Gets or creates session by ID (an ended session is started afresh)."""
        validate_id(session_id)
        meta = await self.bus.lifecycle.load(session_id)
        if meta is not None and not meta.is_terminal():
            return await self._touch(session_id) or ManagedSession.from_metadata(meta)
        if meta is None:
            try:
                handle = await self.bus.open(session_id, ttl=self.session_timeout)
                return ManagedSession.from_metadata(handle.metadata)
            except SessionExists:  # opened elsewhere meanwhile
                current = await self.bus.lifecycle.load(session_id)
                if current is not None and not current.is_terminal():
                    return ManagedSession.from_metadata(current)
        return ManagedSession.from_metadata(
            await replace_session(self.bus, session_id, ttl=self.session_timeout)
        )

    async def start_new_session(self, session_id: str) -> ManagedSession:
        """Creates a brand-new session, closing (reason ``"replaced"``) any it replaces.

        The replaced session's history is dropped.
        """
        validate_id(session_id)
        meta = await replace_session(
            self.bus, session_id, reason=REPLACED_REASON, ttl=self.session_timeout
        )
        return ManagedSession.from_metadata(meta)

    async def get_session(self, session_id: str) -> ManagedSession | None:
        """Gets session and updates last-used time; None if absent or ended."""
        validate_id(session_id)
        return await self._touch(session_id)

    async def _touch(self, session_id: str) -> ManagedSession | None:
        def change(meta: SessionMetadata) -> SessionMetadata | None:
            if meta.is_terminal():
                return None
            return meta.model_copy(update={"updated_at": time.time()})

        try:
            meta, _ = await self.bus.lifecycle.modify(session_id, change)
        except SessionNotFound:
            return None
        if meta.is_terminal():
            return None
        if meta.ttl_seconds is not None:
            await self.bus.lifecycle.refresh_timer(session_id, meta.ttl_seconds)
        return ManagedSession.from_metadata(meta)

    async def end_session(self, session_id: str) -> ManagedSession | None:
        """End the session (CLOSED, reason ``"ended"``, broadcast); None if it does not exist."""
        validate_id(session_id)
        try:
            meta, _ = await self.bus.lifecycle.terminate(
                session_id, SessionState.CLOSED, ENDED_REASON
            )
        except SessionNotFound:
            return None
        return ManagedSession.from_metadata(meta)

    async def expire_old_sessions(self) -> list[str]:
        """Expire every session idle past its TTL; return their ids.

        A session counts as idle once its idle timer is gone (sends and
        touches push it back), so this agrees with the expiry watcher and
        only catches what it missed.
        """
        lifecycle = self.bus.lifecycle
        now = time.time()
        expired: list[str] = []
        for meta in await lifecycle.list_sessions():
            if meta.is_terminal() or meta.ttl_seconds is None:
                continue
            if now - meta.updated_at <= meta.ttl_seconds:
                continue  # touched recently: no need to look at its timer
            try:
                if await lifecycle.expire_idle(meta.session_id):
                    expired.append(meta.session_id)
            except SessionNotFound:
                continue
        return expired

    # -- agents ----------------------------------------------------------------

    async def register_agent(self, session_id: str, agent_id: str) -> ManagedSession:
        """Add ``agent_id`` to the session's participants."""
        agent = validate_id(agent_id, "agent id")

        def change(meta: SessionMetadata) -> SessionMetadata | None:
            if meta.is_terminal():
                raise SessionTerminated(session_id, meta.state.value)
            if agent in meta.participants:
                return None
            return meta.model_copy(update={
                "participants": [*meta.participants, agent], "updated_at": time.time(),
            })

        meta, _ = await self.bus.lifecycle.modify(session_id, change)
        return ManagedSession.from_metadata(meta)

    async def mark_agent_streaming(self, session_id: str, agent_id: str) -> ManagedSession:
        """Record that ``agent_id`` streams in the session (registering it if needed)."""
        agent = validate_id(agent_id, "agent id")

        def change(meta: SessionMetadata) -> SessionMetadata | None:
            if meta.is_terminal():
                raise SessionTerminated(session_id, meta.state.value)
            if agent in meta.agents_streaming and agent in meta.participants:
                return None
            participants = meta.participants
            if agent not in participants:
                participants = [*participants, agent]
            return meta.model_copy(update={
                "participants": participants,
                "agents_streaming": [*meta.agents_streaming, agent]
                if agent not in meta.agents_streaming else meta.agents_streaming,
                "updated_at": time.time(),
            })

        meta, _ = await self.bus.lifecycle.modify(session_id, change)
        return ManagedSession.from_metadata(meta)

    async def unmark_agent_streaming(self, session_id: str, agent_id: str) -> None:
        """Record that ``agent_id`` stopped streaming; quiet if the session is gone or ended."""
        agent = validate_id(agent_id, "agent id")

        def change(meta: SessionMetadata) -> SessionMetadata | None:
            if meta.is_terminal() or agent not in meta.agents_streaming:
                return None
            return meta.model_copy(update={
                "agents_streaming": [a for a in meta.agents_streaming if a != agent],
                "updated_at": time.time(),
            })

        with contextlib.suppress(SessionNotFound):
            await self.bus.lifecycle.modify(session_id, change)

    async def interrupt_streaming_agents(self, session_id: str) -> set[str]:
        """Sends a transient cancel signal to all currently streaming agents in a session.

        This does not end the session or mark it as inactive, and the signal
        is not stored. Returns the agents that were streaming (and were
        signalled); nothing is sent if none were.
        """
        validate_id(session_id)
        meta = await self.bus.lifecycle.load(session_id)
        if meta is None or meta.is_terminal() or not meta.agents_streaming:
            return set()
        handle = SessionHandle(bus=self.bus, metadata=meta)
        await handle.interrupt(INTERRUPT_REASON)
        agents = set(meta.agents_streaming)
        logger.info("interrupted %d streaming agent(s) in %r", len(agents), session_id)
        return agents

    def __repr__(self) -> str:
        state = "running" if self._task is not None else "stopped"
        return f"<SessionManager timeout={self.session_timeout:.0f}s {state}>"
