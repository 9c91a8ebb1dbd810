"""Session: the per-participant handle on one session (AG2's network client ``Session``).

``await sb.open(...)`` creates a session and returns a handle;
``sb.session(session_id, participant=...)`` attaches to an existing one
without any I/O. A handle is cheap: it holds the session id, the identity
its envelopes are sent as (``participant``) and a snapshot of the record
(``metadata``; :meth:`Session.info` refreshes it).

What the bus enforces rather than trusts (the AG2 hub trusted the client):

* delegation depth: a reply's depth is its causation envelope's depth + 1,
  found in the bus's cache or the session's stored history; a caller may
  raise it, never lower it, and it may not pass the session's ``max_depth``;
* ``idempotency_key`` derives the envelope id, so a retried send is stored
  once (``Nats-Msg-Id`` de-duplication) and returns the same id;
* ``ttl_seconds`` becomes a per-message ``Nats-TTL``: the server drops the
  envelope, and readers skip it once expired;
* the encoded size is checked before publishing;
* a session the bus knows closed (its record, read or confirmed after a close
  broadcast) refuses sends without a KV read.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError
from sessionbus.bus._closures import ClosedEvent
from sessionbus.bus._feeds import QueueFeed
from sessionbus.bus._history import (
    LiveFeed,
    find_depth,
    read_history,
    read_newest,
    replay_envelopes,
)
from sessionbus.bus._kv import wire_ttl
from sessionbus.bus._names import DEPTH_HEADER, MSG_ID_HEADER, TTL_HEADER, validate_id
from sessionbus.bus._replies import publish_stored
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus.errors import (
    BusError,
    CausationNotFound,
    ConfigError,
    DepthLimitExceeded,
    EnvelopeTooLarge,
    InvalidEnvelope,
    InvalidIdError,
    SessionNotFound,
    SessionTerminated,
    nats_errors,
)
from sessionbus.bus.settings import check_int, check_ttl
from sessionbus.schemas import (
    EV_TEXT,
    DecodeError,
    EncodeError,
    Envelope,
    SessionMetadata,
    SessionState,
    TaskInfo,
    TaskState,
    decode_map,
    encode,
    idempotent_envelope_id,
    new_envelope_id,
)

if TYPE_CHECKING:
    from sessionbus.bus.core import SessionBus

__all__ = ["Interrupt", "Session", "open_session"]

logger = logging.getLogger(__name__)

def _check_participant(value: object, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidIdError("participant", value, f"must be a str, not {type(value).__name__}")
    if not value:
        if allow_empty:
            return value
        raise InvalidIdError("participant", value, "must not be empty")
    return validate_id(value, "participant")


@dataclass(frozen=True, slots=True)
class Interrupt:
    """A request to stop streaming agents in a session; transient, never stored."""

    session_id: str
    reason: str
    sender: str
    at: float

    def to_wire(self) -> bytes:
        """Encode for the interrupt subject."""
        return encode({"session_id": self.session_id, "reason": self.reason,
                       "sender": self.sender, "at": self.at})

    @classmethod
    def from_wire(cls, raw: bytes) -> Interrupt:
        """Decode; :class:`~sessionbus.schemas.DecodeError` if it is not an interrupt."""
        body = decode_map(raw)
        fields = (body.get("session_id"), body.get("reason", ""), body.get("sender", ""))
        at = body.get("at")
        if not all(isinstance(f, str) for f in fields) or not isinstance(at, int | float):
            raise DecodeError("not an interrupt", raw)
        session_id, reason, sender = (str(f) for f in fields)
        return cls(session_id, reason, sender, float(at))


async def open_session(
    bus: SessionBus,
    session_id: str | None = None,
    *,
    participants: Sequence[str] | None = None,
    ttl: float | None = None,
    metadata: dict[str, Any] | None = None,
    max_depth: int | None = None,
    participant: str = "",
) -> Session:
    """Create a session (ACTIVE) and return its handle; see :meth:`SessionBus.open`."""
    session_id = uuid.uuid4().hex if session_id is None else validate_id(session_id)
    participant = _check_participant(participant)
    if isinstance(participants, str):
        raise ConfigError("participants must be a sequence of ids, not one str")
    members = [_check_participant(p, allow_empty=False) for p in participants or ()]
    if participant and participant not in members:
        members.append(participant)
    ttl_s = bus.settings.session_ttl if ttl is None else check_ttl(ttl, "ttl")
    depth_limit = (bus.settings.max_depth if max_depth is None
                   else check_int(max_depth, "max_depth", least=0))
    if metadata is not None and not isinstance(metadata, dict):
        raise ConfigError(f"metadata must be a dict, got {type(metadata).__name__}")
    now = time.time()
    meta = SessionMetadata(
        session_id=session_id, state=SessionState.ACTIVE, participants=members,
        created_at=now, updated_at=now, ttl_seconds=ttl_s, max_depth=depth_limit,
        metadata=dict(metadata or {}),
    )
    # The record (a compare-and-set create) and its idle timer, in one round trip.
    await bus.lifecycle.open(meta)
    return Session(bus=bus, metadata=meta, participant=participant)


class Session:
    """A participant's handle on one session.

    ``metadata`` is a snapshot: call :meth:`info` to refresh it. A handle
    made by ``sb.session()`` starts unloaded (state PENDING); :meth:`send`
    and :meth:`touch` then use what the bus last saw of the session, reading
    the record once if it saw nothing.
    """

    def __init__(
        self, *, bus: SessionBus, metadata: SessionMetadata, participant: str = "",
        loaded: bool = True,
    ) -> None:
        self._bus = bus
        self._metadata = metadata
        self._participant = participant
        self._loaded = loaded

    @classmethod
    def attach(cls, bus: SessionBus, session_id: str, *, participant: str = "") -> Session:
        """A handle on an existing session, without I/O; ids are checked here."""
        bus.names.session_key(session_id)  # InvalidIdError before any I/O
        participant = _check_participant(participant)
        placeholder = SessionMetadata(session_id=session_id, state=SessionState.PENDING)
        return cls(bus=bus, metadata=placeholder, participant=participant, loaded=False)

    # -- snapshot -------------------------------------------------------------

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self._metadata.session_id

    @property
    def metadata(self) -> SessionMetadata:
        """The record as last read (PENDING placeholder until loaded)."""
        return self._metadata

    @property
    def state(self) -> SessionState:
        """The snapshot's state, or how the session ended if this bus heard it."""
        known = self._bus.lifecycle.states.meta(self.session_id)
        # What the bus knows of an earlier session under the same id does not
        # apply to this snapshot.
        if known is not None and (not self._loaded
                                  or known.created_at >= self._metadata.created_at):
            return known.state
        return self._metadata.state

    @property
    def participant(self) -> str:
        """The identity this handle's envelopes are sent as (``sender_id``)."""
        return self._participant

    @property
    def bus(self) -> SessionBus:
        """The bus this handle uses."""
        return self._bus

    def is_terminal(self) -> bool:
        """Whether the session is known CLOSED or EXPIRED (snapshot or broadcast)."""
        return self.state.is_terminal

    def _check_open(self) -> None:
        state = self.state
        if state.is_terminal:
            raise SessionTerminated(self.session_id, state.value)

    async def _limits(self) -> SessionMetadata:
        """What sending needs (max_depth, ttl, state): the snapshot, the bus's
        cached copy, or else one read of the record."""
        self._check_open()
        meta = self._metadata if self._loaded else self._bus.lifecycle.limits(self.session_id)
        if meta is None:
            meta = await self._load()
        if meta.is_terminal():
            raise SessionTerminated(self.session_id, meta.state.value)
        self._check_open()
        return meta

    async def _load(self) -> SessionMetadata:
        meta = await self._bus.lifecycle.load(self.session_id)
        if meta is None:
            raise SessionNotFound(self.session_id)
        self._metadata, self._loaded = meta, True
        return meta

    # -- sending ----------------------------------------------------------------

    async def send(
        self,
        content: str = "",
        *,
        audience: Sequence[str] | None = None,
        causation_id: str | None = None,
        event_type: str = EV_TEXT,
        event_data: dict[str, Any] | None = None,
        depth: int | None = None,
        priority: int = 0,
        ttl_seconds: float | None = None,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> str:
        """Post an envelope into the session; return its envelope id.

        ``audience=None`` broadcasts to every participant but the sender.
        ``content`` is the text of an ``EV_TEXT`` envelope; other events
        pass ``event_data``. With ``causation_id`` the depth is the
        causation's depth + 1 (``depth`` can only raise it). Raises
        :class:`SessionTerminated`, :class:`CausationNotFound`,
        :class:`DepthLimitExceeded`, :class:`EnvelopeTooLarge`,
        :class:`InvalidEnvelope`. Once the envelope is stored, the send
        returns: a failure to push back the session's idle timer after it
        is logged, not raised (raised, it would have the envelope sent twice).
        """
        meta = await self._limits()
        sid = self.session_id
        hops = 0 if depth is None else check_int(depth, "depth", least=0)
        if causation_id is not None:
            parent = await find_depth(self._bus, sid, causation_id,
                                      stored=self._bus.lifecycle.states.stored_through(sid))
            if parent is None:
                raise CausationNotFound(sid, causation_id)
            hops = max(hops, parent + 1)
        if hops > meta.max_depth:
            raise DepthLimitExceeded(sid, hops, meta.max_depth)
        if ttl_seconds is not None:
            check_ttl(ttl_seconds, "ttl_seconds")
        if isinstance(audience, str):
            raise InvalidEnvelope(sid, "audience must be a sequence of participant ids")
        if idempotency_key is not None:
            envelope_id = idempotent_envelope_id(sid, idempotency_key)
        else:
            envelope_id = new_envelope_id()
        try:
            envelope = Envelope(
                envelope_id=envelope_id, session_id=sid, sender_id=self._participant,
                audience=None if audience is None else tuple(audience),
                event_type=event_type,
                event_data={"text": content} if event_data is None else event_data,
                causation_id=causation_id, trace_id=trace_id, depth=hops,
                idempotency_key=idempotency_key, ttl_seconds=ttl_seconds, priority=priority,
            )
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "envelope"
            raise InvalidEnvelope(sid, f"invalid envelope for {sid!r}: {where}: "
                                       f"{first.get('msg')}") from e
        await self._publish(envelope)
        if meta.ttl_seconds is not None:
            try:
                await self._bus.lifecycle.refresh_timer(sid, meta.ttl_seconds)
            except BusError as e:
                # The envelope is stored: an error now would have it sent again.
                logger.warning("an envelope was sent into %r, but its idle timer was not "
                               "pushed back (the next send tries again): %s", sid, e)
        return envelope_id

    async def _publish(self, envelope: Envelope) -> None:
        try:
            data = encode(envelope)
        except EncodeError as e:
            raise InvalidEnvelope(envelope.session_id, f"invalid envelope for "
                                  f"{envelope.session_id!r}: {e}") from e
        limit = self._bus.settings.max_envelope_bytes
        if len(data) > limit:
            raise EnvelopeTooLarge(envelope.session_id, len(data), limit)
        headers = {MSG_ID_HEADER: envelope.envelope_id, DEPTH_HEADER: str(envelope.depth)}
        if envelope.ttl_seconds is not None:
            headers[TTL_HEADER] = str(wire_ttl(envelope.ttl_seconds))
        what = f"sending into {envelope.session_id!r}"
        with nats_errors(what):
            seq = await publish_stored(
                self._bus.replies, self._bus.names.inbound(envelope.session_id), data, headers,
                within=self._bus.settings.request_timeout, what=what,
                dedupe_window=self._bus.duplicate_window)
        self._bus.lifecycle.remember(envelope)
        if envelope.ttl_seconds is None:
            self._bus.lifecycle.states.note_stored(envelope.session_id, seq)

    # -- lifecycle --------------------------------------------------------------

    async def info(self) -> SessionMetadata:
        """Re-read the record (refreshing the snapshot); :class:`SessionNotFound` if gone."""
        meta = await self._bus.lifecycle.check_idle(await self._load())
        self._metadata = meta
        return meta

    async def close(self, reason: str = "") -> SessionMetadata:
        """Close the session, expiring its open tasks; broadcast once. Idempotent."""
        meta, _ = await self._bus.lifecycle.terminate(self.session_id, SessionState.CLOSED, reason)
        self._metadata, self._loaded = meta, True
        return meta

    async def touch(self) -> None:
        """Count as activity: push back the idle timer (rate-limited)."""
        meta = await self._limits()
        if meta.ttl_seconds is not None:
            await self._bus.lifecycle.refresh_timer(self.session_id, meta.ttl_seconds)

    async def wait_closed(self) -> ClosedEvent:
        """Wait until the session is closed or expires (bound it with ``asyncio.timeout``)."""
        if self._metadata.is_terminal():
            return ClosedEvent.of(self._metadata)
        return await self._bus.lifecycle.states.wait_closed(self.session_id)

    # -- tasks ------------------------------------------------------------------

    async def add_task(self, agent: str, envelope_id: str | None = None) -> TaskInfo:
        """Record a QUEUED task (one agent's turn on ``envelope_id``); idempotent per pair."""
        agent = _check_participant(agent)
        return await self._bus.lifecycle.add_task(self.session_id, agent, envelope_id)

    async def update_task(self, task_id: str, state: TaskState | str) -> TaskInfo:
        """Move a task to ``state``; one already terminal (e.g. EXPIRED by close) stays so."""
        try:
            task_state = TaskState(state)
        except ValueError as e:
            raise ConfigError(f"unknown task state {state!r}") from e
        return await self._bus.lifecycle.update_task(self.session_id, task_id, task_state)

    # -- reading ----------------------------------------------------------------

    def history(
        self, participant: str | None = None, *, after: int = 0, last: int | None = None,
    ) -> AsyncIterator[Envelope]:
        """Replay the stored envelopes in order (those ``participant`` receives, if given).

        ``after`` is a stream sequence (a cursor from :meth:`history_page`
        or a turn's ``sequence``): only envelopes stored after it come. What
        this process sent into the session is among them, even when a
        replica that has not applied it yet answers the read.

        ``last`` asks for only the newest ``last`` of them: the read starts
        where they do (found with a few one-message reads), so it costs
        about the same however long the session is. ConfigError (a
        ValueError) unless an integer of at least 1.
        """
        if last is not None:
            check_int(last, "last", least=1)
        return replay_envelopes(self._bus, self.session_id, participant=participant,
                                after=after, must_reach=self._sent_after(after), last=last)

    def _sent_after(self, after: int) -> int | None:
        """The newest sequence this process stored in the session at, if past ``after``.

        A read waits for a replica that is behind to reach it: it sees what
        this process sent (``read_range``'s ``must_reach``).
        """
        seq = self._bus.lifecycle.states.stored_through(self.session_id)
        return seq if seq is not None and seq > after else None

    async def history_page(
        self, *, after: int = 0, participant: str | None = None, last: int | None = None,
    ) -> tuple[list[Envelope], int]:
        """The envelopes stored after stream sequence ``after``, and the cursor for the next call.

        Pass the returned cursor as ``after`` next time to read only what is
        new: a reader that polls its session costs the new envelopes, not
        the whole history. The cursor is ``after`` when nothing is new.
        ``last``: only the newest ``last`` (as for :meth:`history`), with
        the cursor past them: a view that opens on the end of a long
        session, then polls.
        """
        must_reach = self._sent_after(after)
        if last is not None:
            check_int(last, "last", least=1)
            newest, cursor = await read_newest(self._bus, self.session_id, last,
                                               participant=participant, after=after,
                                               must_reach=must_reach)
            return newest, max(cursor, after)
        found = await read_history(self._bus, self.session_id, after=after,
                                   must_reach=must_reach)
        cursor = found[-1][0] if found else after
        now = time.time()
        envelopes = [e for _, e in found if not e.is_expired(now)
                     and (participant is None or e.is_for(participant))]
        return envelopes, cursor

    def live(self, participant: str | None = None, *, replay: bool = False,
             last: int | None = None) -> LiveFeed:
        """A feed of new envelopes as ``participant`` receives them (all if None).

        Open it (``async with``) before expecting what is sent next; with
        ``replay=True`` it starts with the stored history, with ``last=N``
        with the newest N of it (read from where they start, as
        :meth:`history` does): nothing is missed or repeated between them
        and what comes next. ConfigError unless ``last`` is an integer of
        at least 1.
        """
        if last is not None:
            check_int(last, "last", least=1)
        return LiveFeed(self._bus, self.session_id, participant=participant, replay=replay,
                        last=last)

    subscribe = live

    # -- interrupts -------------------------------------------------------------

    async def interrupt(self, reason: str = "") -> None:
        """Ask whoever streams in this session to stop (core NATS: not stored, not ended)."""
        event = Interrupt(self.session_id, reason, self._participant, time.time())
        with nats_errors(f"interrupting {self.session_id!r}"):
            await self._bus.nc.publish(self._bus.names.interrupt(self.session_id),
                                       event.to_wire())

    def interrupts(self, *, maxsize: int = 1000) -> QueueFeed[Interrupt]:
        """A feed of this session's interrupts (open it before expecting one)."""
        nc, subject = self._bus.nc, self._bus.names.interrupt(self.session_id)
        lifecycle = self._bus.lifecycle
        subs: list[Subscription] = []

        async def on_open(feed: QueueFeed[Interrupt]) -> None:
            async def on_msg(msg: Msg) -> None:
                try:
                    feed.push(Interrupt.from_wire(msg.data))
                except DecodeError as e:
                    logger.warning("ignoring a malformed interrupt on %s: %s", msg.subject, e)

            with nats_errors(f"subscribing to interrupts of {self.session_id!r}"):
                subs.append(await nc.subscribe(subject, cb=on_msg))
                await server_holds_subscriptions(nc, self._bus.settings.request_timeout)
            lifecycle.adopt(feed)

        async def on_close(feed: QueueFeed[Interrupt]) -> None:
            lifecycle.release(feed)
            for sub in subs:
                with contextlib.suppress(Exception):  # the connection may be gone
                    await sub.unsubscribe()
            subs.clear()

        return QueueFeed(on_open=on_open, on_close=on_close, maxsize=maxsize,
                         name=f"interrupts of {self.session_id!r}")

    def __repr__(self) -> str:
        return (f"<Session {self.session_id!r} {self.state.value} "
                f"as {self._participant or '(anonymous)'!r}>")
