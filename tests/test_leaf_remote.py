"""``sessionbus server --leaf-remote`` given several times: one leaf connection, not one per URL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats
import pytest
from nats.aio.msg import Msg
from sessionbus.bus._server import NatsCluster, free_port
from sessionbus.bus._subscriptions import server_holds_subscriptions
from waiting import until

from sessionbus._cli_server import build_server
from sessionbus.cli import build_parser


@pytest.fixture
def hub_cluster() -> Iterator[NatsCluster]:
    cluster = NatsCluster(size=2, name="hub", leaf_hub=True).start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_repeated_leaf_remote_is_one_remote_with_several_urls(
    hub_cluster: NatsCluster,
) -> None:
    argv = ["server", "--port", str(free_port()), "--no-jetstream", "--name", "edge"]
    for node in hub_cluster.servers:
        argv += ["--leaf-remote", f"nats-leaf://127.0.0.1:{node.leaf_listen_port}"]
    edge = build_server(build_parser().parse_args(argv))
    edge.start()
    received: list[bytes] = []

    async def on_msg(msg: Msg) -> None:
        received.append(msg.data)

    def numbered() -> list[bytes]:
        return [data for data in received if data != b"ping"]  # late probes are not copies

    hub_nc = await nats.connect(hub_cluster.servers[0].url)
    edge_nc = await nats.connect(edge.url)
    try:
        await hub_nc.subscribe("probe", cb=on_msg)
        await server_holds_subscriptions(hub_nc, 5)
        for _ in range(200):  # until interest has crossed the leaf link
            await edge_nc.publish("probe", b"ping")
            await edge_nc.flush()
            await asyncio.sleep(0.02)
            if received:
                break
        await asyncio.sleep(0.5)  # a second leaf connection would be up by now
        received.clear()
        for i in range(10):
            await edge_nc.publish("probe", str(i).encode())
        await until(lambda: len(numbered()) >= 10, "the ten publishes")
        await asyncio.sleep(0.3)  # a copy through a second link would arrive meanwhile
        links = [s.monitor("leafz").get("leafnodes", 0) for s in hub_cluster.servers]
    finally:
        await edge_nc.close()
        await hub_nc.close()
        edge.stop()
    print(f"leaf connections {links}, 10 publishes received {len(numbered())} times")
    assert sum(links) == 1, links
    assert sorted(numbered()) == sorted(str(i).encode() for i in range(10))
