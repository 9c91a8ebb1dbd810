"""AG2's history ``Storage`` on JetStream: :class:`NatsStorage` (see :mod:`._jshistory`)."""

from __future__ import annotations

from ag2.events._serialization import deserialize_value, serialize_value

from sessionbus.integrations._jshistory import JetStreamHistory

__all__ = ["NatsStorage"]


class NatsStorage(JetStreamHistory):
    """AG2's ``Storage`` (``ag2.history``) on a JetStream stream of the bus.

    ``save_event`` appends, ``get_history`` reads back in order as a
    session's history is read (a Direct Get batch, then a short-lived
    consumer for a long one), ``set_history`` replaces atomically (one rolled-up
    message), ``drop_history`` purges; events use AG2's own serialization.
    ``bus`` is a started :class:`~sessionbus.bus.SessionBus` the caller owns;
    without one the storage starts ``SessionBus(servers, **options)`` on
    first use and :meth:`close` closes it. ``stream`` names the JetStream
    stream (default ``<prefix>_ag2_history``), created if absent with the
    retention given here (``max_age`` seconds, ``max_bytes``, ``replicas``).
    """

    codec = (serialize_value, deserialize_value)
