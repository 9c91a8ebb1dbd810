"""autogen 0.14's ``autogen.beta`` history ``Storage`` on JetStream: :class:`NatsStorage`.

The older form of AG2 (package ``autogen``, 0.14), whose ``autogen.beta``
has the same ``Storage`` protocol as ag2 1.2. Same stream, same guarantees
as :class:`sessionbus.integrations.ag2.NatsStorage`, events serialized with
``autogen.beta``'s own serialization::

    from autogen.beta.stream import MemoryStream
    from sessionbus.integrations.autogen_beta import NatsStorage

    stream = MemoryStream(NatsStorage("nats://nats:4222"))
"""

from __future__ import annotations

from sessionbus.integrations._jshistory import JetStreamHistory

try:
    from autogen.beta.events._serialization import deserialize_value, serialize_value
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sessionbus.integrations.autogen_beta needs autogen 0.14: pip install 'autogen>=0.14,<0.15'"
    ) from e

__all__ = ["NatsStorage"]


class NatsStorage(JetStreamHistory):
    """``autogen.beta``'s ``Storage`` on a JetStream stream of the bus (see the module)."""

    codec = (serialize_value, deserialize_value)
