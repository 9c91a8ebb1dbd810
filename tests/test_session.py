"""Session handles against a real server: open, send, audience, history, dedup, limits, ids."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sessionbus.bus import Session, SessionBus, _history, _seqread
from sessionbus.bus._names import MSG_ID_HEADER, TTL_HEADER
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import (
    BusError,
    BusTimeout,
    ConfigError,
    ConnectionFailed,
    EnvelopeTooLarge,
    InvalidEnvelope,
    InvalidIdError,
    SessionExists,
    SessionNotFound,
    SessionTerminated,
    TaskNotFound,
)
from sessionbus.schemas import Envelope, SessionState, TaskState, encode

from sessionbus.testing import BusFactory, ServerFactory

HOSTILE_IDS = [
    "a.b.c",
    "*",
    ">",
    "with space",
    "tab\tand\nnewline",
    "ünïcødé 🎉",
    "=looks-encoded",
    "$KV.x.>",
    "x" * 1024,
    "é" * 512,  # 1024 bytes of UTF-8
]


async def stored_count(sb: SessionBus, session_id: str) -> int:
    """Messages the envelope stream holds for one session."""
    info = await sb.js.stream_info(
        sb.names.envelope_stream, subjects_filter=sb.names.history_filter(session_id)
    )
    return sum((info.state.subjects or {}).values())


async def test_open_send_info_close(bus: SessionBus) -> None:
    s = await bus.open("s1", participants=["bob"], participant="alice", ttl=60,
                       metadata={"topic": "x"}, max_depth=3)
    assert isinstance(s, Session)
    assert (s.session_id, s.participant, s.state) == ("s1", "alice", SessionState.ACTIVE)
    assert s.metadata.participants == ["bob", "alice"]
    assert not s.is_terminal()
    envelope_id = await s.send("hello")
    assert len(envelope_id) == 32
    info = await s.info()
    assert (info.ttl_seconds, info.max_depth, info.metadata) == (60.0, 3, {"topic": "x"})
    timer = bus.names.session_timer_key("s1")
    assert await bus.sessions_kv.get(timer) is not None
    closed = await s.close("done")
    assert closed.state is SessionState.CLOSED and closed.close_reason == "done"
    assert s.is_terminal()
    assert (await s.close("again")).close_reason == "done"  # idempotent
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await bus.sessions_kv.get(timer) is not None:  # the timer goes with the session
        assert loop.time() < deadline, "idle timer left behind"
        await asyncio.sleep(0.02)


async def test_open_refuses_a_taken_id_and_defaults(bus: SessionBus) -> None:
    s = await bus.open()
    assert s.metadata.ttl_seconds == bus.settings.session_ttl
    assert s.metadata.max_depth == bus.settings.max_depth
    with pytest.raises(SessionExists):
        await bus.open(s.session_id)
    await s.close()
    with pytest.raises(SessionExists):  # a closed id keeps its history: never reused
        await bus.open(s.session_id)
    with pytest.raises(ConfigError):
        await bus.open(ttl=0)
    with pytest.raises(ConfigError):
        await bus.open(max_depth=-1)


async def test_attach_is_lazy_and_loads_on_first_send(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    with pytest.raises(SessionNotFound):
        await other.session("nobody").info()
    with pytest.raises(SessionNotFound):
        await other.session("nobody").send("x")
    await bus.open("lazy", participant="alice")
    handle = other.session("lazy", participant="bob")
    before = handle.state
    await handle.send("hi")
    assert (before, handle.state) == (SessionState.PENDING, SessionState.ACTIVE)
    assert [e.sender_id async for e in handle.history()] == ["bob"]


async def test_audience_routing(bus: SessionBus, bus_factory: BusFactory,
                                nats_server: NatsServer) -> None:
    other = await bus_factory(nats_server.url)
    alice = await bus.open("room", participants=["bob", "carol"], participant="alice")
    bob = other.session("room", participant="bob")
    carol = other.session("room", participant="carol")
    async with alice.live("alice") as a_in, bob.live("bob") as b_in, carol.live("carol") as c_in:
        await alice.send("to all")
        await alice.send("to bob", audience=["bob"])
        await bob.send("end")
        async with asyncio.timeout(10):
            assert [(await anext(b_in)).content for _ in range(2)] == ["to all", "to bob"]
            # carol gets the broadcast, skips the message for bob, then bob's "end".
            assert [(await anext(c_in)).content for _ in range(2)] == ["to all", "end"]
            # alice never receives her own broadcast nor a message for bob.
            assert (await anext(a_in)).content == "end"
    seen_by_carol = [e.content async for e in alice.history("carol")]
    assert seen_by_carol == ["to all", "end"]
    assert [e.content async for e in alice.history()] == ["to all", "to bob", "end"]


async def test_history_replays_in_order_after_reconnect(nats_server: NatsServer) -> None:
    async with SessionBus(nats_server.url) as first:
        s = await first.open("replayed", participant="alice")
        bob = first.session("replayed", participant="bob")
        sent = []
        for i in range(30):
            sender = s if i % 3 else bob
            sent.append(await sender.send(f"m{i}"))
    async with SessionBus(nats_server.url) as second:
        replay = [e async for e in second.session("replayed").history()]
        assert [e.envelope_id for e in replay] == sent
        assert [e.content for e in replay] == [f"m{i}" for i in range(30)]
        assert {e.sender_id for e in replay} == {"alice", "bob"}


async def test_live_with_replay_has_no_gap(bus: SessionBus) -> None:
    s = await bus.open("tail")
    await s.send("old")
    async with s.live(replay=True) as feed:
        await s.send("new")
        async with asyncio.timeout(10):
            assert [(await anext(feed)).content for _ in range(2)] == ["old", "new"]
    assert feed.closed


async def test_live_from_the_newest_has_no_gap_and_reads_no_more(
    nats_server: NatsServer, bus: SessionBus, bus_factory: BusFactory,
) -> None:
    s = await bus.open("end", participant="user", participants=["user", "agent", "x"])
    for i in range(60):
        await s.send(f"m{i}", audience=["x"] if i % 10 == 0 else ["agent"])
    other = (await bus_factory(nats_server.url)).session("end", participant="agent")
    async with s.live(last=3) as feed, s.live("x", last=2) as for_x:
        await other.send("new", audience=["x"])
        async with asyncio.timeout(10):
            assert [(await anext(feed)).content for _ in range(4)] == [
                "m57", "m58", "m59", "new"]
            assert [(await anext(for_x)).content for _ in range(3)] == ["m40", "m50", "new"]
    async with s.live(last=100) as everything:  # fewer stored: all of them
        async with asyncio.timeout(10):
            assert (await anext(everything)).content == "m0"
    quiet = await bus.open("quiet", participant="user")
    async with quiet.live(last=5) as feed:  # nothing stored yet: what comes next
        await quiet.send("first")
        async with asyncio.timeout(10):
            assert (await anext(feed)).content == "first"
    with pytest.raises(ConfigError):
        s.live(last=0)


async def test_live_replay_of_a_long_session_while_another_client_sends(
    nats_server: NatsServer, bus: SessionBus, bus_factory: BusFactory,
) -> None:
    """The history (read past its first page) and the consumer after it: all, once, in order."""
    s = await bus.open("busy", participant="user")
    stored = _seqread.FIRST_PAGE + _seqread.CONSUMER_PAST + 50
    for i in range(stored):
        await s.send(f"m{i}")
    other = (await bus_factory(nats_server.url)).session("busy", participant="agent")
    more = 100

    async def send_more() -> None:
        for i in range(stored, stored + more):
            await other.send(f"m{i}")

    sending = asyncio.create_task(send_more())
    async with s.live(replay=True) as feed:
        await sending
        await other.send("end")
        async with asyncio.timeout(20):
            got = [(await anext(feed)).content for _ in range(stored + more + 1)]
    assert got == [f"m{i}" for i in range(stored + more)] + ["end"]


async def test_a_clients_reads_wait_for_what_it_stored(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its reads must reach its own last envelope, even from a replica that is behind."""
    asked: list[int | None] = []
    read = _history._read

    async def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("must_reach"))
        return await read(*args, **kwargs)

    monkeypatch.setattr(_history, "_read", recording)
    s = await bus.open("mine", participant="user")
    assert [e async for e in s.history()] == [] and asked == [None]
    await s.send("one")
    await s.send("two")
    stored = [seq for seq, _ in await _history.read_history(bus, "mine")]
    asked.clear()
    assert [e.content async for e in s.history()] == ["one", "two"]
    assert (await s.history_page(after=stored[0]))[1] == stored[1]
    assert [e.content async for e in s.history(after=stored[1])] == []
    await s.send("brief", ttl_seconds=30)  # may be gone when read: not waited for
    assert [e.content async for e in s.history()] == ["one", "two", "brief"]
    assert asked == [stored[1], stored[1], None, stored[1]]
    other = bus.session("mine", participant="agent")
    assert await other.send("re", causation_id=(await s.history_page())[0][0].envelope_id)


async def test_idempotency_key_stores_once(bus: SessionBus) -> None:
    s = await bus.open("dedup")
    first = await s.send("pay", idempotency_key="order-7")
    again = await s.send("pay", idempotency_key="order-7")
    other = await s.send("pay", idempotency_key="order-8")
    assert first == again != other
    assert await stored_count(bus, "dedup") == 2
    replay = [e async for e in s.history()]
    assert [e.envelope_id for e in replay] == [first, other]
    assert replay[0].idempotency_key == "order-7"


async def test_priority_and_ttl_are_carried(bus: SessionBus) -> None:
    s = await bus.open("carry")
    envelope_id = await s.send("urgent", priority=7, ttl_seconds=1.6, trace_id="t-1")
    raw = await bus.js.get_msg(bus.names.envelope_stream,
                               subject=bus.names.stored("carry", bus.partitions))
    assert raw.headers is not None
    assert raw.headers[MSG_ID_HEADER] == envelope_id
    assert raw.headers[TTL_HEADER] == "2"  # whole seconds, rounded up
    from sessionbus.schemas import decode

    envelope = decode(raw.data or b"", Envelope)
    assert (envelope.priority, envelope.ttl_seconds, envelope.trace_id) == (7, 1.6, "t-1")
    # The server drops it once its TTL has run out.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        left = await stored_count(bus, "carry")
        if not left or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert left == 0


async def test_invalid_sends_are_refused(nats_server: NatsServer,
                                         bus_factory: BusFactory) -> None:
    sb = await bus_factory(nats_server.url, max_envelope_bytes=2048)
    s = await sb.open("limits")
    with pytest.raises(EnvelopeTooLarge) as too_large:
        await s.send("x" * 2048)
    assert too_large.value.size > too_large.value.limit == 2048
    assert too_large.value.session_id == "limits"
    with pytest.raises(InvalidEnvelope):
        await s.send("x", priority=42)
    with pytest.raises(InvalidEnvelope):
        await s.send("x", audience="bob")
    with pytest.raises(ConfigError):
        await s.send("x", ttl_seconds=-1)
    with pytest.raises(ConfigError):
        await s.send("x", depth=-1)
    assert await stored_count(sb, "limits") == 0
    await s.send("x" * 1500)  # under the limit once encoded


async def test_send_into_a_closed_session(bus: SessionBus, bus_factory: BusFactory,
                                          nats_server: NatsServer) -> None:
    other = await bus_factory(nats_server.url)
    s = await bus.open("ended", participant="alice")
    bob = other.session("ended", participant="bob")
    await bob.send("before")
    async with asyncio.timeout(10):
        await s.close("bye")
        await bob.wait_closed()
    with pytest.raises(SessionTerminated) as closed:
        await s.send("after")
    assert closed.value.state == "closed"
    with pytest.raises(SessionTerminated):
        await bob.send("after")  # heard the broadcast: no KV read needed
    with pytest.raises(SessionTerminated):
        await bob.touch()
    late = await bus_factory(nats_server.url)
    with pytest.raises(SessionTerminated):  # never heard it: the first send loads the record
        await late.session("ended").send("after")
    assert await stored_count(bus, "ended") == 1


async def test_tasks(bus: SessionBus) -> None:
    s = await bus.open("tasks")
    envelope_id = await s.send("work")
    task = await s.add_task("agent-1", envelope_id)
    assert task.state is TaskState.QUEUED and task.envelope_id == envelope_id
    assert (await s.add_task("agent-1", envelope_id)).task_id == task.task_id  # redelivery
    other = await s.add_task("agent-2", envelope_id)
    running = await s.update_task(task.task_id, TaskState.RUNNING)
    assert running.state is TaskState.RUNNING
    done = await s.update_task(other.task_id, "completed")
    assert done.state is TaskState.COMPLETED
    with pytest.raises(TaskNotFound):
        await s.update_task("nope", TaskState.RUNNING)
    with pytest.raises(ConfigError):
        await s.update_task(task.task_id, "bogus")
    info = await s.info()
    assert {t.task_id: t.state for t in info.tasks.values()} == {
        task.task_id: TaskState.RUNNING, other.task_id: TaskState.COMPLETED}
    closed = await s.close()
    assert closed.tasks[task.task_id].state is TaskState.EXPIRED
    assert closed.tasks[other.task_id].state is TaskState.COMPLETED
    # A worker finishing after the close does not resurrect its task.
    late = await s.update_task(task.task_id, TaskState.COMPLETED)
    assert late.state is TaskState.EXPIRED
    with pytest.raises(SessionTerminated):
        await s.add_task("agent-3", "e-new")


@pytest.mark.parametrize("session_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
async def test_hostile_ids_work_end_to_end(bus: SessionBus, session_id: str) -> None:
    s = await bus.open(session_id, participant="alice", ttl=60)
    async with bus.closed_events() as closures:
        await s.send("one")
        await s.send("two", audience=["bob"])
        replay = [e async for e in bus.session(session_id).history()]
        assert [(e.session_id, e.content) for e in replay] == [
            (session_id, "one"), (session_id, "two")]
        assert (await s.close()).session_id == session_id
        async with asyncio.timeout(10):
            assert (await anext(closures)).session_id == session_id
    assert (await bus.session(session_id).info()).state is SessionState.CLOSED


async def test_bad_ids_fail_before_any_io() -> None:
    sb = SessionBus("nats://127.0.0.1:1")  # never started: any I/O would fail differently
    for bad in ("", "x" * 1025, "é" * 513, "\ud800"):
        with pytest.raises(InvalidIdError):
            await sb.open(bad)
        with pytest.raises(InvalidIdError):
            sb.session(bad)
    with pytest.raises(InvalidIdError):
        await sb.open("ok", participant="p" * 1025)
    with pytest.raises(InvalidIdError):
        await sb.open("ok", participants=[""])


async def test_a_dead_server_gives_bus_errors(nats_server_factory: ServerFactory,
                                              bus_factory: BusFactory) -> None:
    server = nats_server_factory(name="doomed")
    sb = await bus_factory(server.url, request_timeout=1.0, connect_timeout=1.0)
    s = await sb.open("doomed", participant="alice")
    server.stop()
    with pytest.raises((ConnectionFailed, BusTimeout)):
        await s.send("into the void")
    with pytest.raises((ConnectionFailed, BusTimeout)):
        await s.info()
    with pytest.raises((ConnectionFailed, BusTimeout)):
        await sb.open("never")
    with pytest.raises((ConnectionFailed, BusTimeout)):
        await s.history_page(last=5)


async def test_a_send_the_stream_refuses_is_a_bus_error_with_the_reason(bus: SessionBus) -> None:
    s = await bus.open("limited", participant="alice")
    kept = await s.send("small")
    # An operator caps the stream's message size below the bus's own limit.
    info = await bus.js.stream_info(bus.names.envelope_stream)
    info.config.max_msg_size = 512
    await bus.js.update_stream(info.config)
    with pytest.raises(BusError, match=r"sending into 'limited' failed: .*message size") as caught:
        await s.send("x" * 600)
    assert not isinstance(caught.value, (ConnectionFailed, BusTimeout))
    assert [e.envelope_id async for e in s.history()] == [kept]
    assert await s.send("small again")  # the session goes on


async def test_a_reopened_id_is_not_refused_for_its_old_close(bus: SessionBus) -> None:
    s = await bus.open("again", participant="alice")
    await s.close("first life")
    assert s.is_terminal()
    # Another component (the session manager) writes a new life under the id.
    fresh = s.metadata.model_copy(update={
        "state": SessionState.ACTIVE, "created_at": (s.metadata.closed_at or 0.0) + 1,
        "closed_at": None, "close_reason": "", "tasks": {}})
    await bus.sessions_kv.put(bus.names.session_key("again"), encode(fresh))
    with pytest.raises(SessionTerminated):  # nothing re-read yet: the close stands
        await s.send("too early")
    assert (await s.info()).state is SessionState.ACTIVE
    assert not s.is_terminal()
    await s.send("second life")
    assert not bus.session("again").is_terminal()  # the bus forgot the old close
