"""SessionBus.list_sessions against a real server: order, state filter, bad records."""

from __future__ import annotations

import logging

import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsServer
from sessionbus.schemas import SessionState

from sessionbus.testing import BusFactory


async def test_lists_every_session_oldest_first(bus: SessionBus) -> None:
    for sid in ("a", "b", "c"):
        await bus.open(sid, participants=["bob"])
    metas = await bus.list_sessions()
    assert [m.session_id for m in metas] == ["a", "b", "c"]
    assert all(m.participants == ["bob"] for m in metas)
    assert [m.created_at for m in metas] == sorted(m.created_at for m in metas)


async def test_empty_bus_lists_nothing(bus: SessionBus) -> None:
    assert await bus.list_sessions() == []
    assert await bus.list_sessions(state=SessionState.CLOSED) == []


async def test_filters_by_state(bus: SessionBus) -> None:
    for sid in ("open-1", "open-2", "gone"):
        await bus.open(sid)
    await bus.session("gone").close("done")

    active = await bus.list_sessions(state=SessionState.ACTIVE)
    assert [m.session_id for m in active] == ["open-1", "open-2"]
    closed = await bus.list_sessions(state=SessionState.CLOSED)
    assert [(m.session_id, m.close_reason) for m in closed] == [("gone", "done")]
    assert await bus.list_sessions(state=SessionState.EXPIRED) == []
    assert {m.session_id for m in await bus.list_sessions()} == {"open-1", "open-2", "gone"}


async def test_idle_timers_are_not_listed(bus: SessionBus) -> None:
    # A TTL writes a timer key into the same bucket; only records come back.
    await bus.open("timed", ttl=60)
    timer = bus.names.session_timer_key("timed")
    assert await bus.sessions_kv.get(timer) is not None
    assert [m.session_id for m in await bus.list_sessions()] == ["timed"]


async def test_undecodable_record_is_skipped(
    bus: SessionBus, caplog: pytest.LogCaptureFixture
) -> None:
    await bus.open("good")
    bad_key = bus.names.session_key("bad")
    await bus.sessions_kv.put(bad_key, b"\xc1 not msgpack")
    with caplog.at_level(logging.WARNING, logger="sessionbus.bus._lifecycle"):
        metas = await bus.list_sessions()
    assert [m.session_id for m in metas] == ["good"]
    assert any(bad_key in r.getMessage() for r in caplog.records)


async def test_another_bus_sees_the_same_list(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    one = await bus_factory(nats_server.url)
    two = await bus_factory(nats_server.url)
    await one.open("shared")
    await one.session("shared").close()
    closed = await two.list_sessions(state=SessionState.CLOSED)
    assert [m.session_id for m in closed] == ["shared"]
