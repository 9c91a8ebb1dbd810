"""SessionRegistry on one real nats-server, and on the in-memory SessionKVStore."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sessionbus.bus import (
    ExpiredSession,
    InMemorySessionKVStore,
    SessionBus,
    SessionKVStore,
    SessionRegistry,
)
from sessionbus.bus._kv import KVOp
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import (
    BusClosedError,
    ConfigError,
    CorruptRecord,
    DecodeError,
    InvalidIdError,
    InvalidMetrics,
    SessionExpired,
)
from sessionbus.schemas.codec import encode

T = TypeVar("T")

HOSTILE_CALLS = ["*", ">", "normal", "a.b", "a b", "ünïcødé-会话", "=Kg", "x" * 1024, "$KV"]


async def _poll(condition: Callable[[], Awaitable[bool]], *, within: float,
                step: float = 0.02) -> float:
    """Await ``condition()`` until true; return the seconds it took."""
    start = time.monotonic()
    while not await condition():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


async def _next(it: AsyncIterator[T], within: float = 5.0) -> T:
    return await asyncio.wait_for(anext(it), within)


@pytest.fixture
async def registries(bus: SessionBus) -> AsyncIterator[tuple[SessionRegistry, SessionRegistry]]:
    """Two registries with different node ids on one bucket."""
    async with SessionRegistry(bus, node_id="node-a") as a, \
            SessionRegistry(bus, node_id="node-b") as b:
        yield a, b


# -- records ------------------------------------------------------------------


async def test_register_get_and_remove(bus: SessionBus) -> None:
    async with SessionRegistry(bus, node_id="n1", ttl=20) as reg:
        assert (reg.node_id, reg.ttl) == ("n1", 20.0)
        before = time.time()
        await reg.register("call", "s1")
        info = await reg.get("call", "s1")
        assert info is not None
        assert (info.call_id, info.session_id, info.node_id) == ("call", "s1", "n1")
        assert before <= info.started_at == info.metrics_updated_at <= time.time()
        assert info.metrics == {}
        await reg.remove("call", "s1")
        assert await reg.get("call", "s1") is None
        assert await reg.get_for_call("call") == []
    assert SessionRegistry(bus).node_id != SessionRegistry(bus).node_id


async def test_two_nodes_see_the_same_records(
    registries: tuple[SessionRegistry, SessionRegistry],
) -> None:
    a, b = registries
    await a.register("call", "sa")
    await b.register("call", "sb")
    for reg in (a, b):
        infos = await reg.get_for_call("call")
        assert {(i.session_id, i.node_id) for i in infos} == {("sa", "node-a"), ("sb", "node-b")}
    await b.update_metrics("call", "sa", {"tokens": 3})
    info = await a.get("call", "sa")
    assert info is not None and info.metrics == {"tokens": 3} and info.node_id == "node-a"


async def test_get_for_call_is_exact_for_hostile_ids(
    bus: SessionBus, registries: tuple[SessionRegistry, SessionRegistry],
) -> None:
    a, b = registries
    filters: list[str] = []
    real_list = bus.registry_kv.list

    async def spy(key_filter: str = ">") -> Any:
        filters.append(key_filter)
        return await real_list(key_filter)

    bus.registry_kv.list = spy  # type: ignore[method-assign]
    expected: dict[str, set[str]] = {}
    for i, call in enumerate(HOSTILE_CALLS):
        sids = {f"s{i}", f"{call[:100]}.{i}", "*", ">", "é" * 512}
        expected[call] = sids
        for sid in sids:
            await (a if i % 2 else b).register(call, sid)
        await a.request_close(call, "*")  # a close flag is never listed as a session
    for call, sids in expected.items():
        infos = await b.get_for_call(call)
        assert {i.session_id for i in infos} == sids, call
        assert {i.call_id for i in infos} == {call}
    assert await a.get_for_call("unknown") == []
    # Each listing is one server-side filter on the call's token, never a scan.
    assert filters == [bus.names.registry_call_filter(c) for c in [*expected, "unknown"]]
    assert all(not f.startswith("*") and not f.startswith(">") for f in filters)


async def test_update_metrics_replaces_metrics_and_restarts_the_ttl(bus: SessionBus) -> None:
    async with SessionRegistry(bus, ttl=0.8) as reg:
        await reg.register("c", "s")
        first = await reg.get("c", "s")
        assert first is not None
        for i in range(4):  # 4 x 0.3 s: well past the 0.8 s TTL, kept alive throughout
            await asyncio.sleep(0.3)
            await reg.update_metrics("c", "s", {"turns": i, "latency": 0.5, "gone": None})
            assert await reg.get("c", "s") is not None
        info = await reg.get("c", "s")
        assert info is not None
        assert info.metrics == {"turns": 3, "latency": 0.5, "gone": None}
        assert info.metrics_updated_at > first.metrics_updated_at
        assert info.started_at == first.started_at


async def test_sub_second_ttl_reads_absent_then_is_physically_gone(bus: SessionBus) -> None:
    async with SessionRegistry(bus, ttl=0.5) as reg:
        await reg.register("c", "s")
        start = time.monotonic()
        assert await reg.get("c", "s") is not None

        async def absent() -> bool:
            return await reg.get("c", "s") is None

        async def gone() -> bool:
            head = await bus.registry_kv.head(bus.names.registry_key("c", "s"))
            return head is None or head.op is KVOp.EXPIRED

        await _poll(absent, within=3.0, step=0.01)
        read_absent = time.monotonic() - start
        await _poll(gone, within=5.0, step=0.01)
        physically_gone = time.monotonic() - start
    # Measured on an idle machine: ~0.5 s and ~1.0 s; the upper bounds allow a loaded one.
    assert 0.4 <= read_absent < 3.0
    assert physically_gone <= 5.0


# -- heartbeats ---------------------------------------------------------------


async def test_heartbeat_recreates_an_expired_record(
    bus: SessionBus, caplog: pytest.LogCaptureFixture,
) -> None:
    async with SessionRegistry(bus, node_id="host", ttl=0.5) as reg, \
            SessionRegistry(bus, node_id="other", ttl=0.5) as other:
        await reg.register("c", "s1")
        await reg.register("c", "s2")
        started = (await reg.get("c", "s1")).started_at  # type: ignore[union-attr]

        async def both_gone() -> bool:
            heads = [await bus.registry_kv.head(bus.names.registry_key("c", s))
                     for s in ("s1", "s2")]
            return all(h is not None and h.op is KVOp.EXPIRED for h in heads)

        await _poll(both_gone, within=5.0)
        with caplog.at_level(logging.INFO, logger="sessionbus.bus._registry_writer"):
            await reg.refresh({"s1": "c"})
            await reg.update_metrics("c", "s2", {"n": 1})
        assert "had expired" in caplog.text
        s1, s2 = await reg.get("c", "s1"), await reg.get("c", "s2")
        assert s1 is not None and s1.started_at == started and s1.node_id == "host"
        assert s2 is not None and s2.metrics == {"n": 1}
        # A registry that never saw the record re-creates it in its own name.
        await other.update_metrics("c", "fresh", {"n": 2})
        fresh = await reg.get("c", "fresh")
        assert fresh is not None and fresh.node_id == "other"


async def test_heartbeat_can_raise_session_expired_instead(bus: SessionBus) -> None:
    async with SessionRegistry(bus, ttl=0.5, recreate_expired=False) as reg:
        await reg.register("c", "dead")
        await reg.register("c", "alive")

        async def dead_absent() -> bool:
            return await reg.get("c", "dead") is None

        # Before the server drops it: expires_at alone makes it expired.
        await _poll(dead_absent, within=3.0, step=0.01)
        await reg.register("c", "alive")
        with pytest.raises(SessionExpired) as info:
            await reg.refresh({"dead": "c", "alive": "c"})
        assert (info.value.session_id, info.value.call_id) == ("dead", "c")
        assert await reg.get("c", "dead") is None
        assert await reg.get("c", "alive") is not None  # the others were refreshed
        with pytest.raises(SessionExpired):
            await reg.update_metrics("c", "dead", {})
        with pytest.raises(SessionExpired):
            await reg.update_metrics("c", "never-registered", {})


async def test_stale_heartbeat_does_not_undo_a_remove(
    registries: tuple[SessionRegistry, SessionRegistry],
) -> None:
    a, b = registries
    await a.register("c", "s")
    await a.update_metrics("c", "s", {"n": 1})  # a now holds the record's revision
    await b.remove("c", "s")
    # a's compare-and-set names a revision the delete replaced: it re-reads and stops.
    await a.refresh({"s": "c"})
    await a.update_metrics("c", "s", {"n": 2})
    assert await b.get("c", "s") is None
    # The same on one node: remove, then a late heartbeat from an old snapshot.
    await a.register("c", "t")
    await a.remove("c", "t")
    await a.refresh({"t": "c"})
    assert await a.get("c", "t") is None
    # register() is explicit and does bring a removed id back.
    await a.register("c", "t")
    assert await b.get("c", "t") is not None


async def test_concurrent_heartbeats_from_two_nodes_and_a_remove(
    registries: tuple[SessionRegistry, SessionRegistry],
) -> None:
    a, b = registries
    await a.register("c", "busy")
    await asyncio.gather(*(
        (a if i % 2 else b).update_metrics("c", "busy", {"i": i}) for i in range(40)
    ))
    info = await a.get("c", "busy")
    assert info is not None and info.metrics["i"] in range(40)

    await a.register("c", "ending")
    beats = [(a if i % 2 else b).update_metrics("c", "ending", {"i": i}) for i in range(40)]
    await asyncio.gather(*beats[:20], b.remove("c", "ending"), *beats[20:])
    assert await a.get("c", "ending") is None
    assert await b.get_for_call("c") == [info]


# -- close requests -----------------------------------------------------------


async def test_close_requests_are_pushed_to_the_hosting_node(
    registries: tuple[SessionRegistry, SessionRegistry],
) -> None:
    a, b = registries
    for sid in ("mine-0", "mine-1", "mine-2"):
        await a.register("call", sid)
    await b.register("call", "theirs")
    closes = a.close_requests()
    await b.request_close("call", "mine-0")
    # Once the first flag has come through, the watch is live: what follows is pushed.
    assert await _next(closes) == "mine-0"
    await b.request_close("call", "theirs")  # not a's session: a never hears of it
    start = time.monotonic()
    await b.request_close("call", "mine-2")
    assert await _next(closes) == "mine-2"
    latency = time.monotonic() - start
    assert latency < 1.0  # measured: median 0.4 ms, at most 2 ms
    # Polling still works, and flags never show up as sessions.
    assert await a.get_close_requests({"mine-1": "call", "mine-2": "call"}) == ["mine-2"]
    await a.remove("call", "mine-0")
    assert await b.get_close_requests({"theirs": "call"}) == ["theirs"]
    assert {i.session_id for i in await a.get_for_call("call")} == {"mine-1", "mine-2", "theirs"}
    await a.remove("call", "mine-2")
    assert await a.get_close_requests({"mine-2": "call"}) == []
    await b.request_close("call", "mine-1")
    assert await _next(closes) == "mine-1"
    await closes.aclose()


async def test_close_requests_include_pending_flags_and_records_naming_this_node(
    bus: SessionBus,
) -> None:
    async with SessionRegistry(bus, node_id="n1") as before:
        await before.register("c", "s1")
        await before.register("c", "s2")
        await before.request_close("c", "s1")
    # A new registry with the same node id (a restarted process) owns them too.
    async with SessionRegistry(bus, node_id="n1") as after, \
            SessionRegistry(bus, node_id="n2") as stranger:
        closes = after.close_requests()
        assert await _next(closes) == "s1"
        await stranger.request_close("c", "s2")
        assert await _next(closes) == "s2"
        got: asyncio.Queue[str] = asyncio.Queue()
        stranger.on_close_request(got.put_nowait)
        await stranger.register("c", "n2-own")
        await after.request_close("c", "s1")  # not hosted on n2
        await after.request_close("c", "n2-own")
        # Flags arrive in order: had s1 been n2's, it would have come first.
        assert await asyncio.wait_for(got.get(), 5.0) == "n2-own"
        await closes.aclose()


async def test_iterators_and_callbacks_end_when_the_registry_stops(bus: SessionBus) -> None:
    reg = SessionRegistry(bus)
    await reg.start()
    got: list[str] = []

    async def consume() -> None:
        async for sid in reg.close_requests():
            got.append(sid)

    async def consume_expired() -> None:
        async for _ in reg.expired():
            pass

    tasks = [asyncio.create_task(consume()), asyncio.create_task(consume_expired())]
    callback = reg.on_close_request(got.append)
    await reg.register("c", "s")
    await reg.request_close("c", "s")
    await _poll(lambda: _true(len(got) == 2), within=5.0)
    await reg.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    assert callback.done()
    await reg.stop()  # idempotent
    assert tasks[0].done() and not reg.started
    # Start, stop, start: a stopped registry opens again, by start() or by use.
    await reg.register("c", "s2")
    assert reg.started and (await reg.get("c", "s2")) is not None
    await reg.stop()
    await reg.start()
    assert [i.session_id for i in await reg.get_for_call("c")] == ["s", "s2"]
    await reg.stop()


async def _true(value: bool) -> bool:
    return value


async def test_closing_the_bus_stops_its_registries(nats_server: NatsServer) -> None:
    sb = await SessionBus.connect(nats_server.url)
    reg = SessionRegistry(sb)
    await reg.start()
    closes = reg.close_requests()
    await reg.register("c", "s")
    await reg.request_close("c", "s")
    assert await _next(closes) == "s"  # iterating
    pending = asyncio.ensure_future(anext(closes, None))
    await sb.close()
    assert await asyncio.wait_for(pending, 5.0) is None
    assert not reg.started


# -- expiry -------------------------------------------------------------------


async def test_expired_yields_server_markers_but_not_removals(bus: SessionBus) -> None:
    async with SessionRegistry(bus, ttl=0.5, tombstone_ttl=1) as reg:
        await reg.register("c", "removed-before")
        await reg.remove("c", "removed-before")
        await reg.register("c", "expired-before")

        async def expired_before() -> bool:
            head = await bus.registry_kv.head(bus.names.registry_key("c", "expired-before"))
            return head is not None and head.op is KVOp.EXPIRED

        await _poll(expired_before, within=5.0)
        events = reg.expired()
        first = asyncio.ensure_future(anext(events))
        start = time.monotonic()
        await reg.register("c", "x")
        await reg.register("c", "removed-after")
        await reg.remove("c", "removed-after")
        assert await asyncio.wait_for(first, 5.0) == ExpiredSession("c", "x")
        took = time.monotonic() - start  # 0.5 s TTL is 1 s on the wire: measured ~1.0 s
        assert 0.4 < took < 4.0

        # Both tombstones expire (as MaxAge markers too); then a sentinel expires.
        async def tombstones_expired() -> bool:
            for sid in ("removed-before", "removed-after"):
                head = await bus.registry_kv.head(bus.names.registry_key("c", sid))
                if head is not None and head.op is not KVOp.EXPIRED:
                    return False
            return True

        await _poll(tombstones_expired, within=5.0)
        await reg.register("c", "sentinel")
        assert await _next(events) == ExpiredSession("c", "sentinel")
        await events.aclose()


async def test_expired_callback_sees_hostile_ids(bus: SessionBus) -> None:
    async with SessionRegistry(bus, ttl=0.5) as reg:
        got: asyncio.Queue[ExpiredSession] = asyncio.Queue()
        reg.on_expired(got.put)
        await reg.register("*", "a.b c")  # its marker comes a second later
        assert await asyncio.wait_for(got.get(), 5.0) == ExpiredSession("*", "a.b c")


# -- bad input ----------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, "30", True, None])
def test_invalid_ttl_is_a_config_error(ttl: Any) -> None:
    with pytest.raises(ConfigError):
        SessionRegistry(ttl=ttl)


def test_invalid_options_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        SessionRegistry(tombstone_ttl=0)
    with pytest.raises(ConfigError):
        SessionRegistry(poll_interval=-1)
    with pytest.raises(ConfigError):
        SessionRegistry(store={"not": "a store"})  # type: ignore[arg-type]
    with pytest.raises(InvalidIdError):
        SessionRegistry(node_id="")


@pytest.mark.parametrize("bad", ["", 5, None, "x" * 1025, "é" * 513, "\ud800"])
async def test_hostile_ids_raise_invalid_id_before_io(
    registries: tuple[SessionRegistry, SessionRegistry], bad: Any,
) -> None:
    reg, _ = registries
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: reg.register(bad, "s"), lambda: reg.register("c", bad),
        lambda: reg.get(bad, "s"), lambda: reg.get("c", bad),
        lambda: reg.get_for_call(bad), lambda: reg.remove("c", bad),
        lambda: reg.update_metrics("c", bad, {}), lambda: reg.refresh({"s": bad}),
        lambda: reg.request_close(bad, "s"), lambda: reg.get_close_requests({bad: "c"}),
    ]
    for call in calls:
        with pytest.raises(InvalidIdError):
            await call()


@pytest.mark.parametrize("metrics", [
    None, [("a", 1)], "tokens=1", {1: 2}, {"a": "1"}, {"a": True}, {"a": [1]},
    {"a": {"b": 1}}, {"a": 2**64},
])
async def test_bad_metrics_raise_invalid_metrics(
    registries: tuple[SessionRegistry, SessionRegistry], metrics: Any,
) -> None:
    reg, _ = registries
    await reg.register("c", "s")
    with pytest.raises(InvalidMetrics):
        await reg.update_metrics("c", "s", metrics)
    info = await reg.get("c", "s")
    assert info is not None and info.metrics == {}


async def test_undecodable_records_are_reported_or_skipped(
    bus: SessionBus, registries: tuple[SessionRegistry, SessionRegistry],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg, _ = registries
    await reg.register("c", "good")
    garbage = b"\xc1garbage"
    await bus.registry_kv.put(bus.names.registry_key("c", "bad"), garbage)
    await bus.registry_kv.put(bus.names.registry_key("c", "shape"), encode({"x": 1}))
    other = encode({"session_id": "zz", "call_id": "c", "node_id": "n", "started_at": 1.0,
                    "metrics_updated_at": 1.0, "expires_at": time.time() + 60})
    await bus.registry_kv.put(bus.names.registry_key("c", "lies"), other)
    with pytest.raises(CorruptRecord) as info:
        await reg.get("c", "bad")
    assert isinstance(info.value, DecodeError)
    assert info.value.raw == garbage and info.value.key == bus.names.registry_key("c", "bad")
    for sid in ("shape", "lies"):
        with pytest.raises(CorruptRecord):
            await reg.get("c", sid)
    with caplog.at_level(logging.WARNING, logger="sessionbus.bus.registry"):
        infos = await reg.get_for_call("c")
    assert [i.session_id for i in infos] == ["good"]
    assert caplog.text.count("skipping registry record") == 3
    # The hosting node's heartbeat overwrites what it cannot read.
    await reg.refresh({"bad": "c"})
    fixed = await reg.get("c", "bad")
    assert fixed is not None and fixed.node_id == reg.node_id


# -- lifecycle and stores -----------------------------------------------------


async def test_use_before_start_and_unstarted_bus(nats_server: NatsServer,
                                                  bus: SessionBus) -> None:
    reg = SessionRegistry(bus)  # a registry on a started bus needs no start() of its own
    await reg.register("c", "s")
    assert (await reg.get("c", "s")) is not None
    with pytest.raises(BusClosedError):  # a callback needs a started registry to end it
        SessionRegistry(bus).on_close_request(print)
    with pytest.raises(BusClosedError):
        await SessionRegistry(SessionBus(nats_server.url)).start()


async def test_without_a_store_the_registry_runs_its_own_bus(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SESSIONBUS_URL", nats_server.url)
    async with SessionRegistry(node_id="own") as reg:
        await reg.register("c", "s")
        assert nats_server.monitor("connz")["num_connections"] == 1
        async with SessionBus(nats_server.url) as sb, SessionRegistry(sb) as peer:
            info = await peer.get("c", "s")
            assert info is not None and info.node_id == "own"
    await _poll(lambda: _true(nats_server.monitor("connz")["num_connections"] == 0),
                within=5.0)


async def test_without_a_store_or_url_it_starts_an_embedded_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SESSIONBUS_URL", raising=False)
    async with SessionRegistry() as reg:
        await reg.register("c", "s")
        assert [i.session_id for i in await reg.get_for_call("c")] == ["s"]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_in_memory_store_honours_ttls_and_the_interface() -> None:
    clock = _Clock()
    store = InMemorySessionKVStore(clock=clock, sweep_every=2)
    assert isinstance(store, SessionKVStore)
    assert await store.set("a.1", b"x", 0.5) is True
    assert await store.set("a.2", b"y", 10, only_if_exists=True) is False
    await store.mset([("a.2", b"y", 10), ("b.1", b"z", 10)])
    assert await store.mget(["a.1", "a.2", "nope"]) == [b"x", b"y", None]
    assert sorted(await store.keys("a.")) == ["a.1", "a.2"]
    clock.now += 0.5
    assert await store.get("a.1") is None
    await store.expire("a.2", "gone", ttl=1)
    clock.now += 0.9
    assert await store.get("a.2") == b"y"
    clock.now += 0.2
    assert await store.keys("") == ["b.1"]
    await store.delete(["b.1", "never"])
    assert await store.keys("") == []
    with pytest.raises(ConfigError):
        await store.set("k", b"v", 0)
    await store.set("k", b"v", 1)
    clock.now += 2
    assert store.sweep() == 1 and len(store) == 0


async def test_registry_on_an_in_memory_store() -> None:
    sessions = {f"{call[:50]}-s": call for call in HOSTILE_CALLS}
    async with SessionRegistry(InMemorySessionKVStore(), node_id="mem", ttl=0.3,
                               poll_interval=0.05) as reg:
        for sid, call in sessions.items():
            await reg.register(call, sid)
        await reg.request_close("*", "*-s")
        for sid, call in sessions.items():
            assert [i.session_id for i in await reg.get_for_call(call)] == [sid]
        assert await reg.get_close_requests(sessions) == ["*-s"]
        await reg.update_metrics("*", "*-s", {"n": 1})
        info = await reg.get("*", "*-s")
        assert info is not None and info.metrics == {"n": 1} and info.node_id == "mem"
        closes = reg.close_requests()
        assert await _next(closes) == "*-s"
        await closes.aclose()
        await reg.remove(">", ">-s")
        await reg.refresh({">-s": ">"})
        assert await reg.get(">", ">-s") is None  # the tombstone holds
        events = reg.expired()
        got = await _next(events)
        assert got.session_id in sessions and got.session_id != ">-s"
        await events.aclose()
        await reg.refresh({"*-s": "*"})  # expired: written again
        assert await reg.get("*", "*-s") is not None
