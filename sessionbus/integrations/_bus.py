"""The bus behind an integration: given, or started (and restarted) on demand.

Framework objects have their own lifecycles (``start``/``close``, context
managers, first use), sometimes run several times on one object. An
integration holds a :class:`BusLink`: either a started
:class:`~sessionbus.bus.SessionBus` the caller owns (never closed here), or
connection settings from which the link starts a bus of its own on each
:meth:`BusLink.open` after a :meth:`BusLink.close`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats.js.errors
from nats.js import api

from sessionbus.bus._kv import Bucket, bind_bucket
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusClosedError

__all__ = ["BusLink", "ensure_bucket", "ensure_stream"]


class BusLink:
    """A started bus for an integration: the caller's, or one of its own.

    ``bus`` is a :class:`SessionBus` the caller starts and closes. Without
    it, :meth:`open` starts ``SessionBus(servers, **options)`` (the embedded
    server when there are no servers and no ``SESSIONBUS_URL``) and
    :meth:`close` closes it; :meth:`open` after :meth:`close` starts a new one.
    """

    def __init__(
        self, bus: SessionBus | None, servers: str | Sequence[str] | None, options: dict[str, Any]
    ) -> None:
        self._given = bus
        self._servers = servers
        self._options = options
        self._own: SessionBus | None = None
        self._lock = asyncio.Lock()

    @property
    def owned(self) -> bool:
        """Whether the link starts its own bus."""
        return self._given is None

    @property
    def current(self) -> SessionBus | None:
        """The bus in use, if open."""
        return self._given if self._given is not None else self._own

    async def open(self) -> SessionBus:
        """The started bus (starting an own one if needed)."""
        if self._given is not None:
            if not self._given.started:
                raise BusClosedError("the SessionBus given to this integration is not started")
            return self._given
        async with self._lock:
            if self._own is None:
                bus = SessionBus(self._servers, **self._options)
                await bus.start()
                self._own = bus
            return self._own

    async def close(self) -> None:
        """Close an own bus; a given one is left to its owner."""
        async with self._lock:
            bus, self._own = self._own, None
        if bus is not None:
            await bus.close()


async def ensure_bucket(bus: SessionBus, name: str) -> Bucket:
    """Bind the KV bucket ``name`` on ``bus``, creating it (per-key TTLs on) if absent."""
    return await bind_bucket(bus.nc, bus.js, name, replicas=bus.replicas,
                             domain=bus.settings.domain,
                             request_timeout=bus.settings.request_timeout)


async def ensure_stream(bus: SessionBus, config: api.StreamConfig) -> api.StreamInfo:
    """Create the stream ``config`` describes, or bind it if another node did."""
    assert config.name is not None
    try:
        return await bus.js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        pass
    try:
        return await bus.js.add_stream(config)
    except nats.js.errors.BadRequestError as e:
        if e.err_code == 10058:
            return await bus.js.stream_info(config.name)
        raise
