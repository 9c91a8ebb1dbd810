"""pytest fixtures that start real nats-server processes on free loopback ports.

Loaded automatically as a pytest plugin once sessionbus is installed
(entry point ``sessionbus``). Every server is stopped by its PID when the
test ends, and temporary data directories are removed.

Fixtures:

* ``nats_server``: one JetStream server.
* ``nats_server_factory``: call it to start more (``jetstream=``, ``domain=``...).
* ``nats_cluster``: a 3-node JetStream cluster (:class:`~bus.server.NatsCluster`).
* ``nats_leaf``: a :class:`LeafTopology`: a JetStream hub (domain ``hub``)
  and a leaf node without JetStream connected to it.
* ``bus_factory``: ``await bus_factory(url, **options)`` gives a started
  :class:`~bus.SessionBus`, closed at teardown.
* ``bus``: a started bus on ``nats_server``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bus.core import SessionBus
from bus.server import NatsCluster, NatsServer

try:
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - the dev extra installs it
    _async_fixture = pytest.fixture  # type: ignore[assignment]

__all__ = ["LeafTopology", "ServerFactory"]

#: JetStream domain of the hub in :func:`nats_leaf`.
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
def nats_server_factory() -> Iterator[ServerFactory]:
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
def nats_server(nats_server_factory: ServerFactory) -> NatsServer:
    """One JetStream-enabled nats-server on a free loopback port."""
    return nats_server_factory(name="single")


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster on loopback."""
    cluster = NatsCluster(size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def nats_leaf(nats_server_factory: ServerFactory) -> LeafTopology:
    """A JetStream hub in domain ``hub`` and a leaf node (no JetStream) joined to it."""
    hub = nats_server_factory(name="hub", domain=HUB_DOMAIN, leaf_listen_port=0)
    leaf = nats_server_factory(
        name="leaf", jetstream=False,
        leaf_remotes=[f"nats-leaf://127.0.0.1:{hub.leaf_listen_port}"],
    )
    hub.wait_leafnodes(1)
    return LeafTopology(hub=hub, leaf=leaf)


@_async_fixture
async def bus_factory() -> AsyncIterator[BusFactory]:
    """``await bus_factory(url, **options)``: a started SessionBus, closed at teardown."""
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
async def bus(nats_server: NatsServer, bus_factory: BusFactory) -> SessionBus:
    """A started SessionBus on a fresh single server."""
    return await bus_factory(nats_server.url)
