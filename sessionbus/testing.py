"""pytest fixtures that start real nats-server processes on free loopback ports.

Loaded automatically as a pytest plugin once sessionbus is installed
(entry point ``sessionbus``). Every server is stopped by its PID when the
test ends, and temporary data directories are removed.

Fixtures:

* ``sessionbus_server``: one JetStream server.
* ``sessionbus_server_factory``: call it to start more (``jetstream=``, ``domain=``...).
* ``sessionbus_cluster``: a 3-node JetStream cluster (:class:`~sessionbus.bus._server.NatsCluster`).
* ``sessionbus_leaf``: a :class:`LeafTopology`: a JetStream hub (domain ``hub``)
  and a leaf node without JetStream connected to it.
* ``sessionbus_bus_factory``: ``await sessionbus_bus_factory(url, **options)`` gives a started
  :class:`~sessionbus.bus.SessionBus`, closed at teardown.
* ``sessionbus_bus``: a started bus on ``sessionbus_server``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.bus.core import SessionBus

try:
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - the dev extra installs it
    _async_fixture = pytest.fixture  # type: ignore[assignment]

__all__ = ["BusFactory", "LeafTopology", "ServerFactory"]

#: JetStream domain of the hub in :func:`sessionbus_leaf`.
HUB_DOMAIN = "hub"

ServerFactory = Callable[..., NatsServer]
BusFactory = Callable[..., Awaitable[SessionBus]]


@dataclass
class LeafTopology:
    """A hub with JetStream (domain ``hub``) and a leaf node connected to it."""

    hub: NatsServer
    leaf: NatsServer
    domain: str = HUB_DOMAIN


@pytest.fixture
def sessionbus_server_factory() -> Iterator[ServerFactory]:
    """Start nats-servers on demand; all are stopped by PID at teardown."""
    started: list[NatsServer] = []

    def start(**kwargs: Any) -> NatsServer:
        server = NatsServer(**kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def sessionbus_server(sessionbus_server_factory: ServerFactory) -> NatsServer:
    """One JetStream-enabled nats-server on a free loopback port."""
    return sessionbus_server_factory(name="single")


@pytest.fixture
def sessionbus_cluster() -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster on loopback."""
    cluster = NatsCluster(size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sessionbus_leaf(sessionbus_server_factory: ServerFactory) -> LeafTopology:
    """A JetStream hub in domain ``hub`` and a leaf node (no JetStream) joined to it."""
    hub = sessionbus_server_factory(name="hub", domain=HUB_DOMAIN, leaf_listen_port=0)
    leaf = sessionbus_server_factory(
        name="leaf", jetstream=False,
        leaf_remotes=[f"nats-leaf://127.0.0.1:{hub.leaf_listen_port}"],
    )
    hub.wait_leafnodes(1)
    return LeafTopology(hub=hub, leaf=leaf)


@_async_fixture
async def sessionbus_bus_factory() -> AsyncIterator[BusFactory]:
    """``await sessionbus_bus_factory(url, **options)``: a started bus, closed at teardown."""
    buses: list[SessionBus] = []

    async def make(servers: Any = None, **options: Any) -> SessionBus:
        bus = SessionBus(servers, **options)
        await bus.start()
        buses.append(bus)
        return bus

    yield make
    for bus in reversed(buses):
        await bus.close()


@_async_fixture
async def sessionbus_bus(
    sessionbus_server: NatsServer, sessionbus_bus_factory: BusFactory
) -> SessionBus:
    """A started SessionBus on a fresh single server."""
    return await sessionbus_bus_factory(sessionbus_server.url)
