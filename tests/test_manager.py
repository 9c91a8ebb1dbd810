"""SessionManager: agentopera's session manager with its state in the bus's session records."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sessionbus.bus as bus_pkg
from sessionbus.bus._server import NatsServer
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import ConfigError, InvalidIdError, SessionNotFound, SessionTerminated
from sessionbus.bus.manager import ManagedSession, Session, SessionManager
from sessionbus.bus.session import Session as SessionHandle
from sessionbus.schemas import SessionState

BusFactory = Callable[..., Awaitable[SessionBus]]

# Another process's manager: an agent streams in a shared session until it
# hears the interrupt, then stops streaming.
_AGENT = """
import asyncio, sys
from sessionbus.bus.core import SessionBus
from sessionbus.bus.manager import SessionManager

async def main():
    async with SessionBus(sys.argv[1]) as sb:
        manager = SessionManager(sb)
        await manager.start_session("shared")
        await manager.mark_agent_streaming("shared", "remote-agent")
        async with sb.session("shared").interrupts() as interrupts:
            print("ready", flush=True)
            event = await asyncio.wait_for(anext(interrupts), 30)
        print("interrupted", event.reason, flush=True)
        await manager.unmark_agent_streaming("shared", "remote-agent")

asyncio.run(main())
"""


async def _poll(check: Callable[[], Awaitable[Any]], *, within: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.05)


async def _history_count(bus: SessionBus, session_id: str) -> int:
    info = await bus.js.stream_info(
        bus.names.envelope_stream, subjects_filter=bus.names.history_filter(session_id)
    )
    return sum((info.state.subjects or {}).values())


def test_the_model_is_the_seeds() -> None:
    assert Session is ManagedSession
    assert bus_pkg.ManagedSession is ManagedSession
    assert bus_pkg.Session is SessionHandle  # sessionbus.bus.Session is the per-participant handle
    model = ManagedSession(session_id="s1")
    before = model.last_updated
    model.mark_agent_streaming("a1")
    assert model.agents_streaming == {"a1"} and model.last_updated >= before
    model.unmark_agent_streaming("a1")
    model.unmark_agent_streaming("never")
    assert model.agents_streaming == set()
    model.mark_agent_streaming("a2")
    model.touch()
    model.end_session()
    assert model.state is SessionState.CLOSED and not model.is_active
    assert model.agents_streaming == set()


async def test_settings_are_checked(bus: SessionBus) -> None:
    with pytest.raises(ConfigError):
        SessionManager(bus, session_timeout_minutes=0)
    with pytest.raises(ConfigError):
        SessionManager(bus, cleanup_interval_sec=-1)
    manager = SessionManager(bus, session_timeout_minutes=2, cleanup_interval_sec=5)
    assert (manager.session_timeout, manager.cleanup_interval) == (120.0, 5.0)


async def test_start_get_and_end(bus: SessionBus) -> None:
    manager = SessionManager(bus, session_timeout_minutes=5)
    assert await manager.get_session("s1") is None
    first = await manager.start_session("s1")
    assert first.session_id == "s1" and first.is_active
    meta = await bus.lifecycle.load("s1")
    assert meta is not None and meta.ttl_seconds == 300.0
    again = await manager.start_session("s1")
    assert again.start_time == first.start_time  # got, not created
    got = await manager.get_session("s1")
    assert got is not None and got.last_updated > first.last_updated
    ended = await manager.end_session("s1")
    assert ended is not None and ended.state is SessionState.CLOSED
    assert (await bus.lifecycle.load("s1")).close_reason == "ended"  # type: ignore[union-attr]
    assert await manager.get_session("s1") is None
    assert await manager.end_session("never-was") is None
    # An ended session is started afresh.
    fresh = await manager.start_session("s1")
    assert fresh.is_active and fresh.start_time > first.start_time
    with pytest.raises(InvalidIdError):
        await manager.start_session("")


async def test_start_new_session_replaces_and_drops_history(bus: SessionBus) -> None:
    manager = SessionManager(bus)
    old = await manager.start_session("s1")
    await bus.session("s1", participant="user").send("before")
    assert await _history_count(bus, "s1") == 1
    async with bus.closed_events() as closes:
        new = await manager.start_new_session("s1")
        event = await asyncio.wait_for(anext(closes), 10)
    assert (event.session_id, event.state, event.reason) == ("s1", SessionState.CLOSED,
                                                             "replaced")
    assert new.is_active and new.start_time > old.start_time
    assert await _history_count(bus, "s1") == 0
    got = await manager.get_session("s1")
    assert got is not None and got.start_time == new.start_time
    # Replacing an id that never existed just creates it.
    assert (await manager.start_new_session("s2")).is_active


async def test_two_managers_share_agents_and_streaming(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    one = SessionManager(await bus_factory(nats_server.url))
    two = SessionManager(await bus_factory(nats_server.url))
    await one.start_session("s1")
    await one.register_agent("s1", "planner")
    await two.register_agent("s1", "coder")
    await two.mark_agent_streaming("s1", "coder")
    await one.mark_agent_streaming("s1", "writer")  # registers it too
    seen = await one.get_session("s1")
    assert seen is not None
    assert seen.agents == {"planner", "coder", "writer"}
    assert seen.agents_streaming == {"coder", "writer"}
    await one.unmark_agent_streaming("s1", "coder")
    await one.unmark_agent_streaming("s1", "coder")  # idempotent
    seen = await two.get_session("s1")
    assert seen is not None and seen.agents_streaming == {"writer"}
    with pytest.raises(SessionNotFound):
        await one.register_agent("absent", "x")
    await two.end_session("s1")
    with pytest.raises(SessionTerminated):
        await one.mark_agent_streaming("s1", "late")
    await one.unmark_agent_streaming("s1", "writer")  # quiet once ended
    await one.unmark_agent_streaming("absent", "writer")


async def test_interrupt_reaches_listeners_and_keeps_the_session(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    bus_a = await bus_factory(nats_server.url)
    bus_b = await bus_factory(nats_server.url)
    manager = SessionManager(bus_a)
    await manager.start_session("s1")
    assert await manager.interrupt_streaming_agents("s1") == set()
    await manager.mark_agent_streaming("s1", "a1")
    await manager.mark_agent_streaming("s1", "a2")
    async with bus_b.session("s1").interrupts() as interrupts:
        interrupted = await manager.interrupt_streaming_agents("s1")
        event = await asyncio.wait_for(anext(interrupts), 10)
    assert interrupted == {"a1", "a2"}
    assert event.session_id == "s1" and event.reason == "interrupt_streaming_agents"
    after = await manager.get_session("s1")
    assert after is not None and after.is_active
    assert after.agents_streaming == {"a1", "a2"}  # the agents unmark themselves
    assert await manager.interrupt_streaming_agents("absent") == set()


async def test_expire_old_sessions_catches_what_no_watcher_saw(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    # Opened on a bus that then goes away, taking its expiry watcher along.
    opener = await bus_factory(nats_server.url)
    await SessionManager(opener, session_timeout_minutes=1 / 60).start_session("idle")
    await SessionManager(opener, session_timeout_minutes=30).start_session("busy")
    await opener.close()
    bus = await bus_factory(nats_server.url)
    assert not bus.lifecycle.watching
    timer = bus.names.session_timer_key("idle")

    async def timer_gone() -> bool:
        return await bus.sessions_kv.get(timer) is None

    await _poll(timer_gone, within=10)
    manager = SessionManager(bus)
    assert await manager.expire_old_sessions() == ["idle"]
    meta = await bus.lifecycle.load("idle")
    assert meta is not None and meta.state is SessionState.EXPIRED
    assert await manager.get_session("busy") is not None
    assert await manager.expire_old_sessions() == []


async def test_background_task_runs_until_shutdown(bus: SessionBus) -> None:
    manager = SessionManager(bus, cleanup_interval_sec=0.05)
    calls = 0
    original = manager.expire_old_sessions

    async def counting() -> list[str]:
        nonlocal calls
        calls += 1
        return await original()

    manager.expire_old_sessions = counting  # type: ignore[method-assign]
    await manager.start()
    assert bus.lifecycle.watching

    async def ran_twice() -> bool:
        return calls >= 2

    await _poll(ran_twice, within=10)
    await manager.shutdown()
    stopped_at = calls
    await asyncio.sleep(0.2)
    assert calls == stopped_at
    await manager.shutdown()  # idempotent


async def test_a_manager_in_another_process(bus: SessionBus) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SESSIONBUS_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _AGENT, bus.url, stdout=asyncio.subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).startswith(b"ready")
        manager = SessionManager(bus)
        seen = await manager.get_session("shared")
        assert seen is not None and seen.agents_streaming == {"remote-agent"}
        assert await manager.interrupt_streaming_agents("shared") == {"remote-agent"}
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.split() == [b"interrupted", b"interrupt_streaming_agents"]
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    after = await manager.get_session("shared")
    assert after is not None and after.agents_streaming == set() and after.is_active
