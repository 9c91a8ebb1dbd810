"""Session lifecycle across connections: close broadcasts, leaf nodes, idle expiry, interrupts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.aio.msg import Msg
from pausing import paused_until_logged, stream_leader
from sessionbus.bus import ClosedEvent, SessionBus
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus.errors import BusClosedError
from sessionbus.schemas import SessionMetadata, SessionState, TaskState

from sessionbus.testing import BusFactory, LeafTopology


async def until(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0, every: float = 0.05
) -> None:
    """Poll an async or sync condition until true, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        assert loop.time() < deadline, f"condition not met within {within}s"
        await asyncio.sleep(every)


async def wait_for_interest(publisher: SessionBus, listener: SessionBus) -> None:
    """Return once ``listener`` hears close broadcasts from ``publisher`` (leaf interest)."""
    probe = f"probe-{uuid.uuid4().hex}"
    wire = ClosedEvent(probe, SessionState.CLOSED, "probe", time.time()).to_wire()
    heard = await listener.nc.subscribe(listener.names.closed(probe))
    try:
        await server_holds_subscriptions(listener.nc, 5)
        deadline = time.monotonic() + 20
        while True:  # interest crosses the leaf link in its own time
            await publisher.nc.publish(publisher.names.closed(probe), wire)
            try:
                await heard.next_msg(timeout=0.1)
                return
            except TimeoutError:  # nats-py's is one
                assert time.monotonic() < deadline, "no interest across the link"
    finally:
        await heard.unsubscribe()


async def test_close_is_heard_by_a_second_connection(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    s = await bus.open("watched", participant="alice")
    queued = await s.add_task("agent-a", await s.send("one"))
    finished = await s.add_task("agent-b", await s.send("two"))
    await s.update_task(finished.task_id, TaskState.COMPLETED)
    async with other.closed_events() as closures:
        await s.close("user left")
        async with asyncio.timeout(10):
            event = await anext(closures)
            assert await other.session("watched").wait_closed() == event
    assert (event.session_id, event.state, event.reason) == (
        "watched", SessionState.CLOSED, "user left")
    info = await other.session("watched").info()
    assert info.state is SessionState.CLOSED and info.closed_at == event.at
    assert info.tasks[queued.task_id].state is TaskState.EXPIRED
    assert info.tasks[finished.task_id].state is TaskState.COMPLETED


async def test_close_reaches_a_leaf_node_client(
    nats_leaf: LeafTopology, bus_factory: BusFactory
) -> None:
    hub = await bus_factory(nats_leaf.hub.url)
    leaf = await bus_factory(nats_leaf.leaf.url, domain=nats_leaf.domain)
    await wait_for_interest(hub, leaf)
    await wait_for_interest(leaf, hub)
    s = await hub.open("edge.call", participant="hub-agent")
    from_leaf = leaf.session("edge.call", participant="edge-agent")
    envelope_id = await from_leaf.send("from the edge")
    task = await from_leaf.add_task("edge-agent", envelope_id)
    assert [e.sender_id async for e in s.history()] == ["edge-agent"]
    async with leaf.closed_events() as closures:
        await s.close("hub closed it")
        async with asyncio.timeout(10):
            event = await anext(closures)
    assert (event.session_id, event.state) == ("edge.call", SessionState.CLOSED)
    assert from_leaf.is_terminal()
    info = await from_leaf.info()
    assert info.tasks[task.task_id].state is TaskState.EXPIRED
    # The other way round: a leaf client closes, the hub hears it.
    edge = await leaf.open("edge.2", participant="edge-agent")
    async with hub.closed_events() as closures:
        await edge.close("edge done")
        async with asyncio.timeout(10):
            assert (await anext(closures)).session_id == "edge.2"


async def test_idle_sessions_expire_with_one_broadcast(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    async with other.closed_events() as closures:
        started = time.monotonic()
        one = await bus.open("idle-1s", ttl=1)
        sub = await bus.open("idle-300ms", ttl=0.3)
        assert bus.lifecycle.watching  # opening with a TTL starts the watcher
        task = await one.add_task("agent", "e-1")
        heard: dict[str, float] = {}
        async with asyncio.timeout(15):
            while len(heard) < 2:
                event = await anext(closures)
                assert event.state is SessionState.EXPIRED and event.reason == "idle"
                heard[event.session_id] = time.monotonic() - started
    assert set(heard) == {"idle-1s", "idle-300ms"}
    # Never before the TTL; the timer has whole-second resolution and slack.
    assert heard["idle-1s"] >= 1.0 and heard["idle-300ms"] >= 0.3
    info = await other.session("idle-1s").info()
    assert info.state is SessionState.EXPIRED and info.close_reason == "idle"
    assert info.tasks[task.task_id].state is TaskState.EXPIRED
    assert sub.is_terminal() and one.is_terminal()  # the opener heard it too


async def test_activity_keeps_a_session_alive(bus: SessionBus) -> None:
    # Busy's timer is written for 3 s and pushed back every second: a loop
    # stalled for up to 2 s on a loaded machine does not let it run out.
    busy = await bus.open("busy", ttl=2)
    idle = await bus.open("idle", ttl=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sends = writes = 0
    stop = asyncio.Event()

    async def keep_busy() -> None:
        nonlocal sends, writes
        while not stop.is_set():
            await busy.send("still here")
            await busy.touch()
            writes += await bus.lifecycle.refresh_timer("busy", 2.0)
            sends += 1
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(keep_busy())
    try:
        async with asyncio.timeout(15):
            await idle.wait_closed()
            # Keep going past what busy's first timer would last, then check it survived.
            await asyncio.sleep(max(0.0, started + 4.0 - loop.time()))
            assert (await busy.info()).state is SessionState.ACTIVE
    finally:
        stop.set()
        await sender
    elapsed = loop.time() - started
    assert (await idle.info()).state is SessionState.EXPIRED
    # The timer is rewritten about once a second, not on every send.
    assert sends > 10 and writes <= elapsed + 1, (sends, writes, elapsed)
    async with asyncio.timeout(15):
        assert (await busy.wait_closed()).state is SessionState.EXPIRED


async def test_one_broadcast_per_expiry_with_many_watchers(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    buses = [await bus_factory(nats_server.url) for _ in range(3)]
    for sb in buses:
        await sb.start_lifecycle()
    nc = await nats.connect(nats_server.url)
    try:
        broadcasts: list[bytes] = []
        sentinels: list[bytes] = []

        async def on_closed(msg: Msg) -> None:
            broadcasts.append(msg.data)

        async def on_sentinel(msg: Msg) -> None:
            sentinels.append(msg.data)

        await nc.subscribe(buses[0].names.closed("contested"), cb=on_closed)
        await nc.subscribe("test.sentinel", cb=on_sentinel)
        await server_holds_subscriptions(nc, 5)
        s = await buses[0].open("contested", ttl=1)
        async with asyncio.timeout(15):
            await s.wait_closed()
        watchers = [sb.lifecycle.watcher for sb in buses]
        await until(lambda: all(w is not None and w.handled >= 1 for w in watchers))
        # Each bus's messages arrive in order: its sentinel comes after any
        # broadcast it published.
        for sb in buses:
            await sb.nc.publish("test.sentinel", b"x")
        await until(lambda: len(sentinels) == 3)
        assert len(broadcasts) == 1
        assert sum(w.expired for w in watchers if w is not None) == 1
    finally:
        await nc.close()


async def test_expiry_missed_by_watchers_is_caught_on_read(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    opener = await bus_factory(nats_server.url)
    await opener.open("orphan", ttl=1)
    await opener.close()  # its watcher goes with it; nobody else runs one
    reader = await bus_factory(nats_server.url)
    assert not reader.lifecycle.watching
    timer = reader.names.session_timer_key("orphan")

    async def timer_gone() -> bool:
        return await reader.sessions_kv.get(timer) is None

    await until(timer_gone, within=15)
    handle = reader.session("orphan")

    async def expired_on_read() -> bool:
        return (await handle.info()).state is SessionState.EXPIRED

    await until(expired_on_read, within=10, every=0.2)
    assert handle.is_terminal()


async def test_interrupt_reaches_listeners_and_is_not_stored(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    s = await bus.open("chatty", participant="user")
    listener = other.session("chatty", participant="agent")
    async with listener.interrupts() as interrupts:
        await s.interrupt("stop talking")
        async with asyncio.timeout(10):
            got = await anext(interrupts)
    assert (got.session_id, got.reason, got.sender) == ("chatty", "stop talking", "user")
    assert interrupts.closed
    assert [e async for e in s.history()] == []
    info = await bus.js.stream_info(bus.names.envelope_stream)
    assert info.state.messages == 0
    assert (await listener.info()).state is SessionState.ACTIVE


async def test_closing_the_bus_ends_waiters_and_feeds(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url)
    s = await sb.open("pending")
    waiter = asyncio.create_task(s.wait_closed())
    feed = await sb.closed_events().open()
    live = await s.live().open()
    interrupts = await s.interrupts().open()
    readers = [asyncio.create_task(anext(f, None)) for f in (feed, live, interrupts)]
    await asyncio.sleep(0)
    await sb.close()
    async with asyncio.timeout(10):  # every reader ends rather than wait forever
        with pytest.raises(BusClosedError):
            await waiter
        assert await asyncio.gather(*readers) == [None, None, None]
    assert feed.closed and live.closed and interrupts.closed


async def _close_while_paused(bus: SessionBus, session_id: str, paused: NatsServer,
                              listen_on: str) -> SessionMetadata:
    """Close ``session_id`` while ``paused`` is stopped; check that the close is broadcast.

    Resumed, the server stores the first write and answers nobody, then
    takes the second: the record has moved on, and it is the close's own.
    """
    listener = await nats.connect(listen_on)
    try:
        heard = await listener.subscribe(bus.names.closed(session_id))
        await listener.flush()
        async with paused_until_logged(paused, "got no answer; writing it again") as resume:
            closed = await bus.session(session_id, participant="a").close("done")
        assert resume.resumed
        assert closed.state is SessionState.CLOSED and closed.close_reason == "done"
        event = ClosedEvent.from_wire((await heard.next_msg(timeout=5)).data)
        assert event.session_id == session_id and event.state is SessionState.CLOSED
        assert event.at == closed.closed_at and event.reason == "done"
    finally:
        await listener.close()
    return closed


async def test_a_close_whose_answer_was_lost_is_sent_again_and_broadcast(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    await bus.open("lost-close", participant="a", participants=["a"])
    closed = await _close_while_paused(bus, "lost-close", nats_server, nats_server.url)
    assert await bus.session("lost-close").info() == closed


@pytest.mark.parametrize("through", ["leader", "follower", "leader again", "follower again"])
async def test_a_close_a_resumed_leader_still_stores_is_known_as_its_own_and_broadcast(
    nats_cluster: NatsCluster, bus_factory: BusFactory, through: str,
) -> None:
    first = await bus_factory(nats_cluster.urls, replicas=3)
    leader, other = await stream_leader(nats_cluster, first, first.sessions_kv.stream)
    # A short pause: a leader paused for longer may step down as it resumes.
    bus = await bus_factory((leader if through.startswith("leader") else other).url,
                            replicas=3, request_timeout=0.5)
    await bus.open("in-process", participant="a", participants=["a"])
    # Resumed, the leader takes both attempts back to back: the second is
    # refused while the first is still being stored, and a replica read
    # right after may not show the first yet.
    await _close_while_paused(bus, "in-process", leader, other.url)
