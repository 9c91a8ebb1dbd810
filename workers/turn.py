"""Turn: what a handler gets for one envelope of one session.

::

    async def handle(turn: Turn) -> None:
        history = await turn.history()
        async for token in model.stream(history):
            if turn.interrupted.is_set():
                break
            await turn.stream(token)
        await turn.reply(answer)

The handler returns to have the envelope acked; it raises to have it
retried (an ordinary exception) or to steer it (see :mod:`sessionbus.workers.control`).
While it runs, no other turn of the same session runs anywhere in the
group. An interrupt of the session sets :attr:`Turn.interrupted` and
cancels the handler's task; a close of the session does the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import WorkerError
from sessionbus.bus.settings import check_int
from sessionbus.schemas import EV_TEXT, Envelope
from sessionbus.workers._delivery import Held
from sessionbus.workers._recent import RecentHistory, read_up_to

if TYPE_CHECKING:
    from sessionbus.bus.session import Session

__all__ = ["Turn", "reply_key"]


def reply_key(causation_id: str, group: str, index: int) -> str:
    """The idempotency key of a turn's ``index``-th reply (0-based) to ``causation_id``."""
    return f"reply:{group}:{causation_id}:{index}"


class Turn:
    """One envelope handed to a handler, with ways to answer into its session."""

    __slots__ = ("_bus", "_handles", "_held", "_owns", "_recent", "_replies", "_session",
                 "agent", "group", "interrupted", "worker_id")

    def __init__(
        self, *, bus: SessionBus, held: Held, group: str, agent: str, worker_id: str,
        interrupted: asyncio.Event, handles: Callable[[str], Session] | None = None,
        recent: RecentHistory | None = None,
        owns: Callable[[int], bool] | None = None,
    ) -> None:
        if held.envelope is None:
            raise WorkerError("a Turn needs a decoded envelope")
        self._bus = bus
        self._held = held
        self._handles = handles
        self._recent = recent
        self._owns = owns
        self._replies = 0
        self._session: Session | None = None
        self.group = group
        """The worker group handling the turn."""
        self.agent = agent
        """The participant id replies are sent as (the group unless configured)."""
        self.worker_id = worker_id
        """The worker process running the turn."""
        self.interrupted = interrupted
        """Set when the session is interrupted or closed; the task is cancelled right after."""

    @property
    def envelope(self) -> Envelope:
        """The envelope this turn handles."""
        envelope = self._held.envelope
        assert envelope is not None
        return envelope

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self._held.session_id

    @property
    def attempt(self) -> int:
        """Delivery count: 1 the first time, more after a retry, a failover or a handback."""
        return self._held.attempt

    @property
    def sequence(self) -> int:
        """The envelope's sequence in the envelope stream (increasing within a session)."""
        return self._held.seq

    @property
    def partition(self) -> int:
        """The partition the session's envelopes are stored in."""
        return self._held.partition

    @property
    def session(self) -> Session:
        """A handle on the session, participating as :attr:`agent` (no I/O until used)."""
        if self._session is None:
            if self._handles is not None:
                self._session = self._handles(self.session_id)
            else:
                self._session = self._bus.session(self.session_id, participant=self.agent)
        return self._session

    async def history(self, *, last: int | None = None) -> Sequence[Envelope]:
        """The session so far: every envelope stored up to and including this turn's own.

        In stream order, nothing stored after this turn's envelope (expired
        envelopes left out). The worker keeps recent history from what it
        pulls, so this reads the stream only for what it has not seen.

        ``last`` asks for only the newest ``last`` of them (this turn's own
        envelope the last one): a handler that builds its context from a
        window of the conversation gets it from the worker's memory while
        the worker holds that many (``WorkerConfig.history_per_session``),
        however long the session has grown, where the whole history reads
        what the worker no longer holds each time. ConfigError (a
        ValueError) unless ``last`` is an integer of at least 1.

        A read answered by a replica that has not applied this turn's own
        envelope yet reads on until one has, for up to 5 seconds, then
        raises BusTimeout (``bus/_seqread.py``).

        A read-only sequence: ``len``, indexing, slicing (a list),
        iteration, ``==`` with a list of the same envelopes and ``+`` (a
        list) work as on a list; take ``list(...)`` to change it. It is a
        window on the worker's own list, so handing it over costs the same
        for any length. Do not modify the envelopes either: later turns get
        the same objects.
        """
        if last is not None:
            check_int(last, "last", least=1)
        if self._recent is not None:
            return await self._recent.history(self._bus, self.session_id, self.sequence, last)
        return await read_up_to(self._bus, self.session_id, self.sequence, last)

    async def reply(
        self,
        content: str,
        *,
        audience: list[str] | None = None,
        event_type: str = EV_TEXT,
        event_data: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Send an envelope into the session, caused by this turn's envelope.

        The sender is :attr:`agent`; the bus sets the delegation depth from
        the causation envelope. ``options`` go to ``Session.send`` (e.g.
        ``priority``, ``ttl_seconds``, ``idempotency_key``). Returns the new
        envelope's id.

        Without an ``idempotency_key`` the reply's id is derived from the
        causing envelope, the group and the reply's index within the turn:
        a turn run again (a redelivery, or a stale worker and its successor)
        sends the same ids, and the stream stores each reply once within its
        duplicate window (the first stored wins). Raises WorkerError when the
        worker no longer owns the session's partition (the turn is stale).
        """
        if self._owns is not None and not self._owns(self._held.partition):
            raise WorkerError(
                f"turn of {self.session_id!r} seq {self.sequence} is stale: this worker "
                "lost the partition; the reply is not sent"
            )
        index = self._replies
        self._replies += 1
        if "idempotency_key" not in options:
            options["idempotency_key"] = reply_key(self.envelope.envelope_id, self.group, index)
        # The depth this worker holds for the causing envelope: no history scan.
        self._bus.lifecycle.states.remember(self.envelope)
        envelope_id: str = await self.session.send(
            content, audience=audience, causation_id=self.envelope.envelope_id,
            event_type=event_type, event_data=event_data, **options,
        )
        return envelope_id

    async def stream(self, chunk: str | bytes) -> None:
        """Publish a transient chunk (e.g. a token) on the session's output subject.

        Core NATS, not stored: listeners on ``names.output(session, agent)``
        see it if they are subscribed now.
        """
        data = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        await self._bus.nc.publish(self._bus.names.output(self.session_id, self.agent), data)

    def __repr__(self) -> str:
        return (f"<Turn session={self.session_id!r} seq={self.sequence} "
                f"attempt={self.attempt} group={self.group!r}>")
