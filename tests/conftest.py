"""Short fixture names for the project's own tests, and a probe of causation lookups.

The installed pytest plugin (:mod:`sessionbus.testing`) names its fixtures
``sessionbus_*`` so that nothing it injects shadows a user's own; these
aliases keep this suite readable.
"""

from __future__ import annotations

from typing import Any

import pytest
from sessionbus.bus import _history
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.bus.core import SessionBus

from sessionbus.testing import BusFactory, LeafTopology, ServerFactory


@pytest.fixture
def nats_server_factory(sessionbus_server_factory: ServerFactory) -> ServerFactory:
    """Start nats-servers on demand (see ``sessionbus_server_factory``)."""
    return sessionbus_server_factory


@pytest.fixture
def nats_server(sessionbus_server: NatsServer) -> NatsServer:
    """One JetStream server (see ``sessionbus_server``)."""
    return sessionbus_server


@pytest.fixture
def nats_cluster(sessionbus_cluster: NatsCluster) -> NatsCluster:
    """A 3-node JetStream cluster (see ``sessionbus_cluster``)."""
    return sessionbus_cluster


@pytest.fixture
def nats_leaf(sessionbus_leaf: LeafTopology) -> LeafTopology:
    """A hub and a leaf node (see ``sessionbus_leaf``)."""
    return sessionbus_leaf


@pytest.fixture
def bus_factory(sessionbus_bus_factory: BusFactory) -> BusFactory:
    """Started buses, closed at teardown (see ``sessionbus_bus_factory``)."""
    return sessionbus_bus_factory


@pytest.fixture
def bus(sessionbus_bus: SessionBus) -> SessionBus:
    """A started bus on a fresh server (see ``sessionbus_bus``)."""
    return sessionbus_bus


@pytest.fixture
def depth_scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The session ids of the session reads causation lookups make, as they make them."""
    scans: list[str] = []
    original = _history._scan_depths

    def counting(bus: SessionBus, session_id: str, *args: Any) -> Any:
        scans.append(session_id)
        return original(bus, session_id, *args)

    monkeypatch.setattr(_history, "_scan_depths", counting)
    return scans
