"""SessionRegistry across a leaf node and on a 3-node cluster losing a node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sessionbus.bus import ExpiredSession, SessionBus, SessionRegistry
from sessionbus.bus._server import NatsCluster, NatsServer
from waiting import until

from sessionbus.testing import LeafTopology

BusFactory = Callable[..., Awaitable[SessionBus]]
ServerFactory = Callable[..., NatsServer]


async def _until(condition: Callable[[], Awaitable[bool]], *, within: float) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.05)


async def _count(reg: SessionRegistry, call_id: str, expected: int) -> bool:
    return len(await reg.get_for_call(call_id)) == expected


async def _shared_through_leaf(hub: SessionRegistry, edge: SessionRegistry) -> None:
    """What one side writes, the other reads, watches and heartbeats."""
    await edge.register("call *", "from-edge")
    await hub.register("call *", "from-hub")
    await hub.register(">", "elsewhere")
    for reg in (hub, edge):
        infos = await reg.get_for_call("call *")
        assert {(i.session_id, i.node_id) for i in infos} == {
            ("from-edge", edge.node_id), ("from-hub", hub.node_id)}
    await edge.update_metrics("call *", "from-hub", {"tokens": 7})  # CAS through the leaf
    info = await hub.get("call *", "from-hub")
    assert info is not None and info.metrics == {"tokens": 7}

    closes = edge.close_requests()
    await hub.request_close("call *", "from-edge")
    assert await asyncio.wait_for(anext(closes), 5) == "from-edge"
    assert await edge.get_close_requests({"from-edge": "call *"}) == ["from-edge"]
    await closes.aclose()

    await edge.remove("call *", "from-hub")
    await hub.refresh({"from-hub": "call *"})  # a stale heartbeat on the hub
    assert await edge.get("call *", "from-hub") is None


async def test_a_leaf_client_shares_the_hubs_records(
    nats_leaf: LeafTopology, bus_factory: BusFactory,
) -> None:
    hub_bus = await bus_factory(nats_leaf.hub.url)
    edge_bus = await bus_factory(nats_leaf.leaf.url, domain=nats_leaf.domain)
    async with SessionRegistry(hub_bus, node_id="hub-node", ttl=0.5) as hub, \
            SessionRegistry(edge_bus, node_id="edge-node", ttl=0.5) as edge:
        await _shared_through_leaf(hub, edge)
        # Expiry markers reach a watcher on the leaf.
        events = edge.expired()
        first = asyncio.ensure_future(anext(events))
        await hub.register("gone", "soon")  # its marker comes a second later
        expired = await asyncio.wait_for(first, 5)
        # Records of the shared part (0.5 s TTL, not refreshed) may expire first.
        seen = {expired}
        while ExpiredSession("gone", "soon") not in seen:
            seen.add(await asyncio.wait_for(anext(events), 5))
        await events.aclose()


async def test_a_leaf_with_its_own_domain_shares_the_hubs_records(
    nats_leaf: LeafTopology, nats_server_factory: ServerFactory, bus_factory: BusFactory,
) -> None:
    edge_server = nats_server_factory(
        name="edge", domain="edge",
        leaf_remotes=[f"nats-leaf://127.0.0.1:{nats_leaf.hub.leaf_listen_port}"],
    )
    nats_leaf.hub.wait_leafnodes(2)
    hub_bus = await bus_factory(nats_leaf.hub.url)
    edge_bus = await bus_factory(edge_server.url, domain=nats_leaf.domain)
    async with SessionRegistry(hub_bus, node_id="hub-node") as hub, \
            SessionRegistry(edge_bus, node_id="edge-node") as edge:
        await _shared_through_leaf(hub, edge)


async def test_reads_keep_working_while_a_cluster_node_is_killed(
    nats_cluster: NatsCluster, bus_factory: BusFactory,
) -> None:
    writer_bus = await bus_factory(nats_cluster.urls, replicas=3)
    names = writer_bus.names
    async with SessionRegistry(writer_bus, node_id="writer") as writer:
        sessions = {f"s{i}": "call" for i in range(20)}
        await asyncio.gather(*(writer.register(c, s) for s, c in sessions.items()))
        info = await writer_bus.js.stream_info(f"KV_{names.registry_bucket}")
        assert info.cluster is not None
        # Kill the bucket's stream leader; read through a node that stays up.
        victim = next(i for i, s in enumerate(nats_cluster.servers)
                      if s.name == info.cluster.leader)
        survivor = nats_cluster.servers[(victim + 1) % 3]
        reader_bus = await bus_factory(survivor.url, replicas=3)
        async with SessionRegistry(reader_bus, node_id="reader") as reader:
            # Direct Gets are served by any replica, and the third one may
            # trail the two that acknowledged a write by a few milliseconds.
            await _until(lambda: _count(reader, "call", 20), within=10)
            reads = errors = 0
            failures: list[str] = []
            slowest = 0.0
            stop = asyncio.Event()

            async def read_loop() -> None:
                nonlocal reads, errors, slowest
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        listed = await reader.get_for_call("call")
                        one = await reader.get("call", "s7")
                        assert len(listed) == 20 and one is not None
                        reads += 1
                    except Exception as e:
                        errors += 1
                        failures.append(repr(e))
                    slowest = max(slowest, time.monotonic() - start)
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(read_loop())
            await asyncio.sleep(0.3)
            before = reads
            nats_cluster.servers[victim].kill()
            await asyncio.sleep(2.0)  # reads are watched through the election, and then
            await until(lambda: reads - before >= 10 or errors > 0, "reads after the kill",
                        within=15)
            stop.set()
            await task
            assert errors == 0, f"{errors} failed reads, {reads} good: {failures[:3]}"
            assert reads - before >= 10  # reads went on after the kill
            # Reads pause while a new leader is elected: measured ~1.57 s.
            assert slowest < 5.0

            # Writes resume once a new leader is elected.
            deadline = time.monotonic() + 20
            while True:
                try:
                    await reader.register("call", "after-kill")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            await _until(lambda: _count(writer, "call", 21), within=10)
