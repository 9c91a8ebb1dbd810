"""AG2 on the bus: NatsStorage (history) and the multi-node MCP SessionStore."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import pytest
from sessionbus.bus._permissions import Role
from sessionbus.bus._server import NatsServer
from sessionbus.bus.core import SessionBus

pytest.importorskip("ag2", reason="ag2 is not installed (pip install 'sessionbus[ag2]')")

from ag2.context import ConversationContext
from ag2.events import ModelRequest, TextInput, ToolCallEvent
from ag2.stream import MemoryStream

from sessionbus._auth import AuthDir
from sessionbus.integrations.ag2 import NatsStorage


def _mcp_store() -> type:
    try:
        from sessionbus.integrations.ag2 import SessionStore
    except ImportError as e:  # ag2.mcp needs mcp>=2.2, which vision-agents 0.6 excludes
        pytest.skip(f"ag2.mcp is not importable here ({e}); install 'sessionbus[ag2]'")
    return SessionStore  # type: ignore[no-any-return]


def _text(event: object) -> str:
    assert isinstance(event, ModelRequest)
    parts = event.parts if isinstance(event.parts, list) else [event.parts]
    part = parts[0]
    assert isinstance(part, TextInput)
    return part.content


async def test_storage_appends_replaces_and_drops(bus: SessionBus) -> None:
    storage = NatsStorage(bus=bus)
    stream = MemoryStream(storage)
    ctx = ConversationContext(stream=stream)
    for word in ("a", "b", "c"):
        await stream.send(ModelRequest([TextInput(word)]), ctx)
    assert [_text(e) for e in await stream.history.get_events()] == ["a", "b", "c"]
    other = MemoryStream(NatsStorage(bus=bus), id=stream.id)  # another reader, same history
    assert [_text(e) for e in await other.history.get_events()] == ["a", "b", "c"]
    await stream.history.replace([ModelRequest([TextInput("z")])])
    await stream.send(ModelRequest([TextInput("after")]), ctx)
    assert [_text(e) for e in await other.history.get_events()] == ["z", "after"]
    await storage.set_history(stream.id, [])
    assert list(await storage.get_history(stream.id)) == []
    await stream.send(ModelRequest([TextInput("again")]), ctx)
    await storage.drop_history(stream.id)
    assert list(await storage.get_history(stream.id)) == []


@pytest.mark.parametrize("serializer", ["json", "pickle"])
async def test_storage_reads_long_histories_in_order(bus: SessionBus, serializer: str) -> None:
    storage = NatsStorage(bus=bus, serializer=serializer)  # type: ignore[arg-type]
    stream_id = uuid.uuid4()
    events = [ToolCallEvent(name=f"f{i}", arguments=str(i)) for i in range(2500)]
    await storage.set_history(stream_id, events[:1000])
    ctx = ConversationContext(stream=MemoryStream(storage, id=stream_id))
    await asyncio.gather(*(storage.save_event(e, ctx) for e in events[1000:1001]))
    for e in events[1001:]:
        await storage.save_event(e, ctx)
    got = list(await storage.get_history(stream_id))
    assert [e.name for e in got] == [e.name for e in events]


async def test_storage_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        NatsStorage(serializer="yaml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NatsStorage(max_age=0)


async def test_session_store_replicas_share_conversations(nats_server: NatsServer) -> None:
    store_cls = _mcp_store()
    from ag2.mcp.errors import UnknownConversationError

    a = store_cls(servers=nats_server.url, ttl=60)
    b = store_cls(servers=nats_server.url, ttl=60)
    try:
        async with a.fresh(principal="alice") as minted:
            ctx = ConversationContext(stream=minted.stream)
            await minted.stream.send(ModelRequest([TextInput("hello")]), ctx)
            handle, stream_id = minted.handle, minted.stream.id
        assert isinstance(minted.stream, MemoryStream)
        async with b.by_handle(handle, principal="alice") as continued:  # the other replica
            assert continued.stream.id == stream_id
            assert [_text(e) for e in await continued.stream.history.get_events()] == ["hello"]
        with pytest.raises(UnknownConversationError):
            async with b.by_handle(handle, principal="mallory"):
                pass
        assert b.bounds.ttl == 60
    finally:
        await a.close()
        await b.close()


async def test_the_session_store_and_storage_run_in_the_worker_role_with_no_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Conversations, their turn locks, LRU evictions and a long history, as a worker."""
    store_cls = _mcp_store()
    auth = AuthDir.init(tmp_path / "auth")
    auth.add_tenant("acme")
    auth.add_user("acme", "admin", Role.ADMIN)
    auth.add_user("acme", "worker", Role.WORKER)
    server = NatsServer(name="secured", accounts_config=auth.accounts_config()).start()
    admin, worker = ({"nkey_seed_file": str(auth.seed_file("acme", user))}
                     for user in ("admin", "worker"))
    try:
        # An admin creates the buckets and the history stream by starting each once.
        prepared = store_cls(servers=server.url, **admin)
        async with prepared.session("prepared") as conv:
            await conv.stream.send(ModelRequest([TextInput("by the admin")]),
                                   ConversationContext(stream=conv.stream))
        await prepared.close()
        a = store_cls(servers=server.url, max_sessions=1, **worker)
        b = store_cls(servers=server.url, **worker)
        try:
            async with a.fresh(principal="alice") as minted:
                ctx = ConversationContext(stream=minted.stream)
                for i in range(500):  # past the first page: the rest through a consumer
                    await minted.stream.send(ModelRequest([TextInput(f"m{i}")]), ctx)
                handle = minted.handle
            async with b.by_handle(handle, principal="alice") as continued:
                texts = [_text(e) for e in await continued.stream.history.get_events()]
            assert texts == [f"m{i}" for i in range(500)]
            await a.acquire("other")  # evicts the first from a's LRU
            async with a.session("prepared") as conv:
                assert [_text(e) for e in await conv.stream.history.get_events()] == [
                    "by the admin"]
        finally:
            await a.close()
            await b.close()
    finally:
        server.stop()
    assert [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()] == []


async def test_lru_of_one_replica_keeps_what_another_just_used(nats_server: NatsServer) -> None:
    store_cls = _mcp_store()
    a = store_cls(servers=nats_server.url, max_sessions=1)
    b = store_cls(servers=nats_server.url)
    evicted: list[str] = []
    a.on_evict = evicted.append
    try:
        first = (await a.acquire("s1")).id
        async with b.session("s1") as conv:  # replica B writes to s1
            await conv.stream.send(ModelRequest([TextInput("from b")]),
                                   ConversationContext(stream=conv.stream))
        await a.acquire("s2")  # A's LRU overflows on s1, which B used since
        assert evicted == []
        async with b.session("s1") as conv:
            assert conv.stream.id == first
            assert [_text(e) for e in await conv.stream.history.get_events()] == ["from b"]
    finally:
        await a.close()
        await b.close()


async def test_replicas_opening_one_new_session_at_once_share_it(
        nats_server: NatsServer) -> None:
    store_cls = _mcp_store()
    stores = [store_cls(servers=nats_server.url) for _ in range(3)]

    async def turn(store: object, word: str) -> object:
        async with store.session("new") as conv:  # type: ignore[attr-defined]
            await conv.stream.send(ModelRequest([TextInput(word)]),
                                   ConversationContext(stream=conv.stream))
            return conv.stream.id

    # Every replica reads the (absent) record before any of them writes it.
    read_together = asyncio.Barrier(len(stores))

    def first_read_waits(load: Callable[[str], Awaitable[object]]
                         ) -> Callable[[str], Awaitable[object]]:
        reads = 0

        async def read(key: str) -> object:
            nonlocal reads
            loaded = await load(key)
            reads += 1
            if reads == 1:
                await read_together.wait()
            return loaded

        return read

    for s in stores:
        s._load = first_read_waits(s._load)
    try:
        ids = await asyncio.gather(*(turn(s, f"r{n}") for n, s in enumerate(stores)))
        assert len(set(ids)) == 1  # one conversation, not one per replica
        history = [_text(e) for e in await (await stores[0].acquire("new")).history.get_events()]
        assert sorted(history) == ["r0", "r1", "r2"]  # no replica's turn went elsewhere
    finally:
        for s in stores:
            await s.close()


_WORKER = textwrap.dedent("""
    import asyncio, os, sys
    import nats
    from ag2.context import ConversationContext
    from ag2.events import ModelRequest, TextInput
    from sessionbus.bus._subscriptions import server_holds_subscriptions
    from sessionbus.integrations.ag2 import SessionStore

    async def main():
        store = SessionStore(servers=sys.argv[1])
        name = sys.argv[2]
        await store._bucket()
        nc = await nats.connect(sys.argv[1])
        go = await nc.subscribe("test.go")
        await server_holds_subscriptions(nc, 5)  # before the test hears "ready"
        print("ready", flush=True)
        await go.next_msg(timeout=60)  # both processes open the new session at once
        await nc.close()
        for i in range(int(sys.argv[3])):
            async with store.session("shared") as conv:
                ctx = ConversationContext(stream=conv.stream)
                await conv.stream.send(ModelRequest([TextInput(f"{name}:{i}:start")]), ctx)
                seen = len(list(await conv.stream.history.get_events()))
                await asyncio.sleep(0.005)
                await conv.stream.send(ModelRequest([TextInput(f"{name}:{i}:end:{seen}")]), ctx)
        await store.close()

    asyncio.run(main())
""")


@pytest.mark.timeout(300)  # two interpreters importing ag2: slow on a loaded machine
async def test_two_processes_serve_one_session_one_turn_at_a_time(
        nats_server: NatsServer) -> None:
    _mcp_store()
    turns = 10
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WORKER, nats_server.url, name, str(turns),
            env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for name in ("p1", "p2")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 240)
            if line != b"ready\n":
                _, err = await proc.communicate()
                pytest.fail(f"worker did not start: {err.decode()[-2000:]}")
        nc = await nats.connect(nats_server.url)
        try:
            await nc.publish("test.go", b"")
            await nc.flush()
        finally:
            await nc.close()
        for proc in procs:
            _, err = await asyncio.wait_for(proc.communicate(), 240)
            assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    store = _mcp_store()(servers=nats_server.url)
    try:
        history = [_text(e) for e in await (await store.acquire("shared")).history.get_events()]
    finally:
        await store.close()
    assert len(history) == 4 * turns  # nothing lost
    for i in range(0, len(history), 2):  # every turn's end follows its own start
        start, end = history[i], history[i + 1]
        assert start.endswith(":start") and end.startswith(start[: -len("start")] + "end:")
        assert int(end.rsplit(":", 1)[1]) == i + 1  # it saw every earlier turn's events
    assert {h.split(":")[0] for h in history} == {"p1", "p2"}


class _Recording:
    """An AG2 model config that answers "ok" and records what each turn was sent."""

    def __init__(self) -> None:
        from ag2.testing import TestConfig

        self.inner = TestConfig("ok", "ok", "ok", "ok")
        self.calls: list[int] = []

    def copy(self) -> _Recording:
        return self

    def create(self) -> object:
        client = self.inner.create()
        calls = self.calls

        async def call(messages: list[object], context: object, **kwargs: object) -> object:
            calls.append(len(list(messages)))
            return await client(messages, context=context, **kwargs)

        return call


async def test_two_mcp_replicas_continue_one_session(nats_server: NatsServer) -> None:
    store_cls = _mcp_store()
    from types import SimpleNamespace

    from ag2 import Agent
    from ag2.mcp import MCPServer
    from ag2.mcp.executor import AgentExecutor
    from ag2.mcp.sessions import SessionConfig
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from sessionbus.integrations.ag2 import use_session_store

    config = _Recording()
    stores = [store_cls(servers=nats_server.url, ttl=60) for _ in range(2)]
    replicas = [AgentExecutor(Agent("a", config=config), stream_progress=False,  # type: ignore[arg-type]
                              session_store=s) for s in stores]
    rc = SimpleNamespace(request=SimpleNamespace(headers={"mcp-session-id": "mcp-1"}),
                         protocol_version=LATEST_HANDSHAKE_VERSION)
    try:
        await replicas[0].call("ask", message="first", request_context=rc)
        await replicas[1].call("ask", message="second", request_context=rc)
        assert len(config.calls) == 2 and config.calls[1] > config.calls[0]  # history carried
        server = MCPServer(Agent("a", config=config), sessions=SessionConfig(ttl=60))  # type: ignore[arg-type]
        use_session_store(server, stores[0])
        assert server._executor._session_store is stores[0]
        assert stores[0].on_evict == server._paused_runs.discard_conversation
    finally:
        for s in stores:
            await s.close()
