"""Knowing that the server holds a core subscription.

A core NATS message published before the server has a subscription is
gone for that subscriber. Whoever subscribes and then expects another
connection's messages must therefore wait for the server to hold the
subscription, which a ``PING`` sent after the ``SUB`` proves: the server
answers in order.

``nc.flush()`` does not prove it in nats-py 2.16: it writes its ``PING``
to the socket at once, while the ``SUB`` still waits in the client's
pending buffer for the flusher task, so the ``PONG`` can come back before
the server has read the ``SUB``. :func:`server_holds_subscriptions`
flushes twice: the flusher has written everything pending by the time the
first ``PONG`` is read, so the second ``PING`` follows the ``SUB``.
"""

from __future__ import annotations

import math

from nats.aio.client import Client

__all__ = ["server_holds_subscriptions"]


async def server_holds_subscriptions(nc: Client, round_trip: float) -> None:
    """Return once the server holds every subscription ``nc`` made so far.

    Raises nats-py's ``FlushTimeoutError`` when a round trip takes longer
    than ``round_trip`` seconds (callers translate it with ``nats_errors``).
    """
    seconds = max(1, math.ceil(round_trip))
    await nc.flush(timeout=seconds)  # the flusher writes the SUB meanwhile
    await nc.flush(timeout=seconds)  # this PING follows it on the socket
