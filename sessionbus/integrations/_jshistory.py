"""An AG2-style history ``Storage`` on JetStream, for any AG2 generation.

Every AG2 stream id is one subject of one JetStream stream
(``<prefix>.ag2.history.<stream id>``), so any process on the bus reads the
same history back, in order:

* ``save_event`` appends one message;
* ``get_history`` reads the subject in stream order the way a session's
  history is read (``bus/_seqread.py``: a Direct Get batch, then a
  short-lived consumer for a long history), and loads the events from the
  last snapshot on;
* ``set_history`` is atomic: the whole new history is one message published
  with a subject rollup, which removes everything before it in the same
  write, so a reader sees the old history or the new one, never a mix (a
  read that spans the rollup restarts from the snapshot it meets);
* ``drop_history`` purges the subject.

Events are serialized the way AG2's own Redis storage does it (AG2's event
serialization, as JSON; ``serializer="pickle"`` keeps exact Python types but
must only be used on a bus whose writers are all trusted). Retention is the
stream's: ``max_age`` (seconds; None keeps history until dropped),
``max_bytes``, ``replicas``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from nats.js import api

from sessionbus.bus._rawsub import header_value
from sessionbus.bus._replies import publish_stored
from sessionbus.bus._seqread import read_errors, read_range
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import ConfigError, nats_errors
from sessionbus.integrations._bus import BusLink, ensure_stream
from sessionbus.integrations._keys import token

__all__ = ["Codec", "JetStreamHistory"]

#: The framework's event serialization: ``(serialize_value, deserialize_value)``.
Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]

Serializer = Literal["json", "pickle"]

_KIND = "Ag2-History"
_SNAPSHOT = "snapshot"
_KIND_LINE = f"\r\n{_KIND}:".encode()
_ROLLUP = "Nats-Rollup"


class JetStreamHistory:
    """AG2's ``Storage`` protocol on a JetStream stream of the bus.

    :attr:`codec` is the framework's event serialization (ag2's, or autogen
    0.14's ``autogen.beta``); each framework's subclass sets it.

    ``bus`` is a started :class:`~sessionbus.bus.SessionBus` the caller owns;
    without one the storage starts ``SessionBus(servers, **options)`` on
    first use and :meth:`close` closes it. ``stream`` names the JetStream
    stream (default ``<prefix>_ag2_history``), created if absent with the
    retention given here; an existing stream keeps its own.
    """

    #: ``(serialize_value, deserialize_value)`` of the framework.
    codec: ClassVar[Codec]

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        bus: SessionBus | None = None,
        stream: str | None = None,
        max_age: float | None = None,
        max_bytes: int | None = None,
        replicas: int | None = None,
        serializer: Serializer = "json",
        **options: Any,
    ) -> None:
        if bus is not None and (servers is not None or options):
            raise ConfigError("pass either a started bus or connection settings, not both")
        if serializer not in ("json", "pickle"):
            raise ConfigError(f"serializer must be 'json' or 'pickle', not {serializer!r}")
        if max_age is not None and not max_age > 0:
            raise ConfigError(f"max_age must be > 0 seconds or None, got {max_age!r}")
        self._link = BusLink(bus, servers, options)
        self._stream_name = stream
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._replicas = replicas
        self._serializer: Serializer = serializer
        self._bound: tuple[SessionBus, str, str] | None = None

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Connect (if needed) and create or bind the stream."""
        if self._bound is not None:
            return
        bus = await self._link.open()
        name = self._stream_name or bus.names.ag2_history_stream
        root = bus.names.ag2_history_root
        await ensure_stream(bus, api.StreamConfig(
            name=name, subjects=[f"{root}.>"], storage=api.StorageType.FILE,
            num_replicas=self._replicas or bus.replicas, allow_direct=True,
            allow_rollup_hdrs=True, deny_delete=False, deny_purge=False,
            max_age=self._max_age or 0, max_bytes=self._max_bytes or -1,
        ))
        self._bound = (bus, name, root)

    async def close(self) -> None:
        """Close the storage's own bus (history stays in the stream)."""
        self._bound = None
        await self._link.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _ready(self) -> tuple[SessionBus, str, str]:
        if self._bound is None:
            await self.start()
        assert self._bound is not None
        return self._bound

    def _subject(self, root: str, stream_id: Any) -> str:
        return f"{root}.{token(str(stream_id))}"

    # -- (de)serialization ----------------------------------------------------------

    def _dump(self, value: Any) -> bytes:
        if self._serializer == "pickle":
            return pickle.dumps(value)
        return json.dumps(self.codec[0](value)).encode()

    def _load(self, data: bytes) -> Any:
        if self._serializer == "pickle":
            return pickle.loads(data)
        return self.codec[1](json.loads(data))

    # -- the Storage protocol -------------------------------------------------------

    async def save_event(self, event: Any, context: Any) -> None:
        """Append ``event`` to the history of ``context.stream.id``."""
        bus, _, root = await self._ready()
        await self._store(bus, self._subject(root, context.stream.id), self._dump(event), None)

    async def get_history(self, stream_id: Any) -> Iterable[Any]:
        """The stream's events, in the order they were stored."""
        bus, name, root = await self._ready()
        subject = self._subject(root, stream_id)
        what = f"reading history on {subject!r}"
        with read_errors(what):
            stored = await read_range(bus.nc, _stored, stream=name, subject_filter=subject,
                                      api_prefix=bus.api_prefix)
        # A snapshot replaces everything before it: load from the last one on.
        start = 0
        for i, (_, (snapshot, _data)) in enumerate(stored):
            if snapshot:
                start = i
        events: list[Any] = []
        for _, (snapshot, data) in stored[start:]:
            if snapshot:
                events = list(self._load(data))
            else:
                events.append(self._load(data))
        return events

    async def set_history(self, stream_id: Any, events: Iterable[Any]) -> None:
        """Replace the stream's history with ``events``, atomically (one rolled-up message)."""
        bus, _, root = await self._ready()
        body = self._dump(list(events))
        await self._store(bus, self._subject(root, stream_id), body,
                          {_KIND: _SNAPSHOT, _ROLLUP: "sub"})

    @staticmethod
    async def _store(bus: SessionBus, subject: str, body: bytes,
                     headers: dict[str, str] | None) -> None:
        """One write into the history stream, its acknowledgement awaited (bus errors)."""
        what = f"writing history on {subject!r}"
        with nats_errors(what):
            await publish_stored(bus.replies, subject, body, headers,
                                 within=bus.settings.request_timeout, what=what)

    async def drop_history(self, stream_id: Any) -> None:
        """Remove the stream's history."""
        bus, name, root = await self._ready()
        await bus.js.purge_stream(name, subject=self._subject(root, stream_id))

    def __repr__(self) -> str:
        where = self._bound[1] if self._bound else self._stream_name
        return f"<{type(self).__name__} stream={where!r} serializer={self._serializer}>"


def _stored(_seq: int, data: bytes, headers: bytes | None) -> tuple[bool, bytes]:
    """Whether a stored message is a snapshot (``set_history``), and its body."""
    return headers is not None and header_value(headers, _KIND_LINE) == _SNAPSHOT.encode(), data
