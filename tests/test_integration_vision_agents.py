"""NatsSessionKVStore: Vision Agents' registry storage on the bus's KV."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest
from sessionbus.bus._server import NatsServer
from sessionbus.bus.core import SessionBus

from sessionbus.integrations.vision_agents import NatsSessionKVStore, decode_key, encode_key
from sessionbus.testing import BusFactory


@pytest.fixture
async def store(bus: SessionBus) -> NatsSessionKVStore:
    s = NatsSessionKVStore(bus=bus)
    await s.start()
    return s


@pytest.mark.parametrize("key", [
    "sessions/call-1/s1", "", "/", "a//b", "sessions/*/>", "x.y/z w", "=odd/ünï", "a/",
])
def test_keys_of_any_characters_round_trip_to_valid_tokens(key: str) -> None:
    stored = encode_key(key)
    assert decode_key(stored) == key
    assert all(tok and "*" not in tok and ">" not in tok and " " not in tok
               for tok in stored.split("."))


async def test_set_get_overwrite_delete(store: NatsSessionKVStore) -> None:
    await store.set("k", b"one", 10)
    await store.set("k", b"two", 10)
    assert await store.get("k") == b"two"
    await store.delete(["k", "never"])
    await store.delete([])
    assert await store.get("k") is None


async def test_sub_second_ttl_is_exact(store: NatsSessionKVStore) -> None:
    await store.set("short", b"v", 0.6)
    await store.set("long", b"v", 5)
    assert await store.get("short") == b"v"
    await asyncio.sleep(0.9)
    assert await store.get("short") is None
    assert await store.mget(["short", "long"]) == [None, b"v"]
    assert await store.keys("") == ["long"]


async def test_only_if_exists_never_creates_or_revives(store: NatsSessionKVStore) -> None:
    await store.set("ghost", b"x", 10, only_if_exists=True)
    assert await store.get("ghost") is None
    await store.set("k", b"a", 0.2)
    await asyncio.sleep(0.3)  # expired by its own deadline, still stored on the server
    await store.set("k", b"b", 10, only_if_exists=True)
    assert await store.get("k") is None
    await store.set("live", b"a", 10)
    await store.set("live", b"b", 10, only_if_exists=True)
    assert await store.get("live") == b"b"


async def test_expire_takes_keys_positionally_and_skips_absent(store: NatsSessionKVStore) -> None:
    await store.mset([("m1", b"a", 1.0), ("m2", b"b", 1.0)])
    await store.expire("m1", "m2", "absent", ttl=5)
    await asyncio.sleep(1.3)
    assert await store.mget(["m1", "m2", "absent"]) == [b"a", b"b", None]
    await store.set("k", b"v", 1.0)
    await store.expire("k", ttl=5)  # one key: refreshed, not iterated as characters
    await asyncio.sleep(1.3)
    assert await store.get("k") == b"v"
    with pytest.raises(TypeError):
        await store.expire(["k"], ttl=5)  # type: ignore[arg-type]


async def test_concurrent_conditional_writes_lose_nothing(store: NatsSessionKVStore) -> None:
    await store.set("k", b"0", 10)
    await asyncio.gather(*(store.set("k", str(i).encode(), 10, only_if_exists=True)
                           for i in range(20)), store.expire("k", ttl=20))
    assert await store.get("k") is not None


async def test_mget_keeps_order_duplicates_and_pages(store: NatsSessionKVStore) -> None:
    items = [(f"p/{i}", str(i).encode(), 10.0) for i in range(600)]
    await store.mset(items)
    keys = ["p/599", "nope", "p/0", "p/599", *[f"p/{i}" for i in range(600)]]
    values = await store.mget(keys)
    assert values[:4] == [b"599", None, b"0", b"599"]
    assert values[4:] == [str(i).encode() for i in range(600)]
    assert await store.mget([]) == []


async def test_keys_prefix_is_exact_for_wildcard_like_ids(store: NatsSessionKVStore) -> None:
    await store.mset([
        ("sessions/*/s1", b"", 10), ("sessions/>/s2", b"", 10), ("sessions/c1/s3", b"", 10),
        ("sessions/c1x/s4", b"", 10), ("close_requests/c1/s3", b"", 10),
    ])
    assert await store.keys("sessions/*/") == ["sessions/*/s1"]
    assert await store.keys("sessions/>/") == ["sessions/>/s2"]
    assert await store.keys("sessions/c1/") == ["sessions/c1/s3"]
    assert sorted(await store.keys("sessions/c1")) == ["sessions/c1/s3", "sessions/c1x/s4"]
    assert len(await store.keys("")) == 5


async def test_bad_ttl_and_values_are_refused_before_io(store: NatsSessionKVStore) -> None:
    for ttl in (0, -1, "5", True):
        with pytest.raises(ValueError):
            await store.set("k", b"v", ttl)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.set("k", "text", 5)  # type: ignore[arg-type]
    assert await store.get("k") is None


async def test_own_bus_restarts_and_nodes_share_data(nats_server: NatsServer) -> None:
    a = NatsSessionKVStore(nats_server.url, bucket="shared")
    b = NatsSessionKVStore(nats_server.url, bucket="shared")
    await a.set("k", b"v", 10)  # first use starts it
    assert await b.get("k") == b"v"
    await a.close()
    await a.start()  # start, stop, start: same data
    assert await a.get("k") == b"v"
    await a.close()
    await b.close()


async def test_vision_agents_registry_runs_on_it(bus_factory: BusFactory,
                                                 nats_server: NatsServer) -> None:
    registry_mod = pytest.importorskip(
        "vision_agents.core.agents.session_registry",
        reason="vision-agents is not installed (pip install 'sessionbus[vision-agents]')",
    )
    agent_mod = pytest.importorskip("vision_agents.core.observability.agent")
    node_a = registry_mod.SessionRegistry(store=NatsSessionKVStore(nats_server.url), ttl=0.8,
                                          node_id="a")
    node_b = registry_mod.SessionRegistry(store=NatsSessionKVStore(nats_server.url), node_id="b")
    async with node_a, node_b:
        await node_a.register("call-1", "s1")
        await node_b.register("call-1", "s2")
        await node_b.register("call-10", "s3")
        metrics = agent_mod.AgentMetrics()
        metrics.llm_latency_ms__avg.update(12.0)
        await node_a.update_metrics("call-1", "s1", metrics)
        infos = {i.session_id: i for i in await node_b.get_for_call("call-1")}
        assert set(infos) == {"s1", "s2"}
        assert infos["s1"].node_id == "a"
        assert infos["s1"].metrics.llm_latency_ms__avg.value() == 12.0
        await node_b.request_close("call-1", "s1")
        assert await node_a.get_close_requests({"s1": "call-1", "s2": "call-1"}) == ["s1"]
        started = time.monotonic()
        while await node_a.get("call-1", "s1") is not None:  # ttl 0.8 s, not rounded up
            assert time.monotonic() - started < 3.0
            await asyncio.sleep(0.05)
        raw = await node_b._store.get("sessions/call-1/s2")
        assert json.loads(raw)["node_id"] == "b"


class _Metrics:
    """A metrics object in the shape of Vision Agents' AgentMetrics."""

    def __init__(self, values: dict[str, float | int | None]) -> None:
        self.values = values

    def to_dict(self) -> dict[str, float | int | None]:
        return dict(self.values)

    @classmethod
    def from_dict(cls, data: dict[str, float | int | None]) -> _Metrics:
        return cls(dict(data))


async def test_bus_registry_takes_and_returns_metrics_objects(bus: SessionBus) -> None:
    from sessionbus.bus.registry import SessionRegistry

    writer = SessionRegistry(bus, node_id="w")
    reader = SessionRegistry(bus, node_id="r")  # never started by hand: first use opens it
    await writer.register("call", "s1")
    await writer.register("call", "s2")
    await writer.update_metrics("call", "s1", _Metrics({"llm_latency_ms__avg": 42.0}))
    await writer.update_metrics("call", "s2", {"tokens": 3})  # dicts still work
    info = await reader.get("call", "s1")
    assert info is not None and isinstance(info.metrics, _Metrics)  # class loaded here
    assert info.metrics.values == {"llm_latency_ms__avg": 42.0}
    by_id = {i.session_id: i.metrics for i in await reader.get_for_call("call")}
    assert by_id["s2"] == {"tokens": 3}
    await writer.stop()
    await writer.start()  # start, stop, start
    await writer.update_metrics("call", "s1", {"plain": 1})
    info = await reader.get("call", "s1")
    assert info is not None and info.metrics == {"plain": 1}


async def test_vision_agents_launcher_heartbeats_keep_a_bus_registry_record(
        bus: SessionBus) -> None:
    agent_mod = pytest.importorskip(
        "vision_agents.core.observability.agent",
        reason="vision-agents is not installed (pip install 'sessionbus[vision-agents]')",
    )
    from sessionbus.bus.registry import SessionRegistry

    registry = SessionRegistry(bus, ttl=0.6)
    async with registry:
        await registry.register("call", "s")
        for i in range(4):  # heartbeats outlast the ttl several times over
            metrics = agent_mod.AgentMetrics()
            metrics.llm_input_tokens__total.inc(i + 1)
            await registry.update_metrics("call", "s", metrics)
            await asyncio.sleep(0.3)
        info = await SessionRegistry(bus).get("call", "s")
        assert info is not None
        assert isinstance(info.metrics, agent_mod.AgentMetrics)
        assert info.metrics.llm_input_tokens__total.value() == 4


_VA_NODE = textwrap.dedent("""
    import asyncio, sys
    from vision_agents.core.agents.session_registry import SessionRegistry
    from vision_agents.core.observability.agent import AgentMetrics
    from sessionbus.integrations.vision_agents import NatsSessionKVStore

    async def main():
        url, node = sys.argv[1], sys.argv[2]
        mine = {f"{node}-s{i}": "call-1" for i in range(3)}
        async with SessionRegistry(store=NatsSessionKVStore(url), node_id=node, ttl=1.5) as reg:
            for sid in mine:
                await reg.register("call-1", sid)
            print("ready", flush=True)
            beats = 0
            stop = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                None, sys.stdin.read))
            while not stop.done():  # the launcher's maintenance loop, every 0.15 s
                beats += 1
                for sid in list(mine):
                    metrics = AgentMetrics()
                    metrics.llm_input_tokens__total.inc(beats)
                    await reg.update_metrics("call-1", sid, metrics)
                for sid in await reg.get_close_requests(mine):
                    await reg.remove("call-1", sid)
                    del mine[sid]
                    print("closed", sid, flush=True)
                await asyncio.sleep(0.15)
            for sid in mine:
                await reg.remove("call-1", sid)

    asyncio.run(main())
""")


@pytest.mark.timeout(300)  # two interpreters importing vision-agents: slow when loaded
async def test_two_processes_share_one_call(nats_server: NatsServer) -> None:
    registry_mod = pytest.importorskip(
        "vision_agents.core.agents.session_registry",
        reason="vision-agents is not installed (pip install 'sessionbus[vision-agents]')",
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _VA_NODE, nats_server.url, node,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for node in ("n1", "n2")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 240)
            assert line.strip() == b"ready", (await proc.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
        async with registry_mod.SessionRegistry(store=NatsSessionKVStore(nats_server.url)) as reg:
            await asyncio.sleep(2.0)  # longer than the ttl: only heartbeats keep the records
            infos = await reg.get_for_call("call-1")
            assert sorted(i.session_id for i in infos) == [
                "n1-s0", "n1-s1", "n1-s2", "n2-s0", "n2-s1", "n2-s2"]
            assert {i.node_id for i in infos} == {"n1", "n2"}
            assert all(i.metrics.llm_input_tokens__total.value() >= 1 for i in infos)
            await reg.request_close("call-1", "n1-s1")  # from a third node
            assert procs[0].stdout is not None
            line = await asyncio.wait_for(procs[0].stdout.readline(), 30)
            assert line.strip() == b"closed n1-s1"
            left = sorted(i.session_id for i in await reg.get_for_call("call-1"))
            assert left == ["n1-s0", "n1-s2", "n2-s0", "n2-s1", "n2-s2"]
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.close()
                assert await asyncio.wait_for(proc.wait(), 60) == 0
            assert await reg.get_for_call("call-1") == []
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
