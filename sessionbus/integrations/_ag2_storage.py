"""AG2's history ``Storage`` on JetStream: :class:`NatsStorage` (see :mod:`._jshistory`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ag2.events._serialization import deserialize_value, serialize_value

from sessionbus.bus.core import SessionBus
from sessionbus.integrations._jshistory import JetStreamHistory, Serializer

__all__ = ["NatsStorage"]


class NatsStorage(JetStreamHistory):
    """AG2's ``Storage`` (``ag2.history``) on a JetStream stream of the bus.

    ``save_event`` appends, ``get_history`` reads back in order in Direct
    Get batches, ``set_history`` replaces atomically (one rolled-up
    message), ``drop_history`` purges; events use AG2's own serialization.
    ``bus`` is a started :class:`~sessionbus.bus.SessionBus` the caller owns;
    without one the storage starts ``SessionBus(servers, **options)`` on
    first use and :meth:`close` closes it. ``stream`` names the JetStream
    stream (default ``<prefix>_ag2_history``), created if absent with the
    retention given here (``max_age`` seconds, ``max_bytes``, ``replicas``).
    """

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
        super().__init__(
            servers, bus=bus, stream=stream, max_age=max_age, max_bytes=max_bytes,
            replicas=replicas, serializer=serializer, codec=(serialize_value, deserialize_value),
            **options,
        )
