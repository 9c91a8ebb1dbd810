"""The docker-compose topology with real processes: a 3-node JetStream cluster (domain
``hub``), a leaf node without JetStream standing for an edge site, one worker of the
``echo`` group beside the cluster and one at the edge, and sessions served across the
edge in both directions.

deploy/*.conf and docker-compose.yml describe the same shape; tests/test_deploy.py
checks those files, this test checks that the shape works.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from cli_procs import Running, run_cli
from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.schemas import EV_TEXT
from sessionbus.workers import Turn, Worker, WorkerConfig
from sessionbus.workers._assignment import assign

DOMAIN = "hub"
PARTITIONS = 8
#: Short failover timings (see WorkerConfig), so joining and rebalancing are quick.
FAST = WorkerConfig(lease_ttl=2, ack_wait=1, poll_interval=0.5, priority_timeout=2.5,
                    drain_timeout=5)


@dataclass
class Site:
    """The topology: cluster nodes and the edge leaf node."""

    cluster: NatsCluster
    edge: NatsServer


@pytest.fixture
def site() -> Iterator[Site]:
    cluster = NatsCluster(size=3, name="sessionbus", domain=DOMAIN, leaf_hub=True)
    edge = NatsServer(name="edge", jetstream=False)
    try:
        cluster.start()
        hub = cluster.servers[0]
        edge.leaf_remotes = [f"nats-leaf://127.0.0.1:{hub.leaf_listen_port}"]
        edge.start()
        hub.wait_leafnodes(1)
        yield Site(cluster, edge)
    finally:
        edge.stop()
        cluster.stop()


def echo_as(label: str) -> Callable[[Turn], Awaitable[None]]:
    """An echo handler that says which side of the edge answered."""

    async def handle(turn: Turn) -> None:
        envelope = turn.envelope
        if envelope.event_type != EV_TEXT:
            return
        await turn.reply(f"{label}: {envelope.content}", audience=[envelope.sender_id])

    return handle


@pytest.fixture
async def buses(site: Site) -> AsyncIterator[tuple[SessionBus, SessionBus]]:
    # The cluster side creates the stream and buckets with 3 replicas; the
    # edge side reaches them through the leaf node in domain "hub".
    core = await SessionBus.connect(site.cluster.urls, replicas=3, partitions=PARTITIONS)
    edge = await SessionBus.connect(site.edge.url, domain=DOMAIN)
    try:
        yield core, edge
    finally:
        await edge.close()
        await core.close()


async def _settled(workers: list[Worker], partitions: int, within: float = 30.0) -> None:
    """Wait until each worker pulls exactly the partitions the group assigns it."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(
            len(w.membership.members()) == len(workers) and w.partitions
            and w.partitions == w.membership.assigned(partitions)
            for w in workers
        ) and frozenset().union(*(w.partitions for w in workers)) == frozenset(range(partitions)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("partitions never settled: " + "; ".join(
        f"{w.worker_id} pulls {sorted(w.partitions)}, assigned "
        f"{sorted(w.membership.assigned(partitions))}, sees {sorted(w.membership.members())}"
        for w in workers))


def _session_in(sb: SessionBus, owned: frozenset[int], tag: str) -> str:
    """A session id whose envelopes land in one of ``owned`` partitions."""
    for n in range(10_000):
        sid = f"{tag}-{n}"
        if sb.names.partition_of(sid, sb.partitions) in owned:
            return sid
    raise AssertionError(f"no session id maps into {sorted(owned)}")


async def test_a_session_is_served_across_the_edge(
    buses: tuple[SessionBus, SessionBus],
) -> None:
    core, edge = buses
    assert core.partitions == edge.partitions == PARTITIONS
    ids = ("cluster-0", "edge-0")  # the balanced assignment gives each half the partitions
    assert all(len(ps) == PARTITIONS // 2 for ps in assign(PARTITIONS, ids).values())
    cluster_worker = Worker(core, group="echo", handler=echo_as("cluster"), config=FAST,
                            worker_id=ids[0])
    edge_worker = Worker(edge, group="echo", handler=echo_as("edge"), config=FAST,
                         worker_id=ids[1])
    await cluster_worker.start()
    await edge_worker.start()
    await _settled([cluster_worker, edge_worker], PARTITIONS)

    # A client at the edge site, talking only to the leaf node.
    served_by_cluster = _session_in(edge, cluster_worker.partitions, "to-hub")
    served_at_edge = _session_in(edge, edge_worker.partitions, "at-edge")
    for sid, answering in ((served_by_cluster, "cluster"), (served_at_edge, "edge")):
        session = await edge.open(sid, participants=["user", "echo"], participant="user")
        async with session.live("user") as replies:
            await session.send("hello across the edge", audience=["echo"])
            async with asyncio.timeout(30):
                reply = await anext(replies)
        assert reply.content == f"{answering}: hello across the edge"
        assert reply.sender_id == "echo" and reply.depth == 1

    # A close from the cluster side is heard at the edge (core broadcast over the leaf).
    at_edge = edge.session(served_at_edge, participant="user")
    await core.session(served_at_edge).close("closed at the hub")
    async with asyncio.timeout(10):
        event = await at_edge.wait_closed()
    assert event.reason == "closed at the hub"

    # Both workers ran on the same stream: the cluster holds the history of
    # the edge's session with 3 replicas.
    history = [e.content async for e in core.session(served_by_cluster).history()]
    assert history == ["hello across the edge", "cluster: hello across the edge"]
    info = await core.js.stream_info(core.names.envelope_stream)
    assert info.config.num_replicas == 3


async def test_the_compose_commands_serve_an_edge_client(site: Site) -> None:
    # What docker-compose.yml runs, as processes: `sessionbus worker` beside
    # the cluster and at the edge, and a client at the edge using the CLI.
    nodes = ",".join(f"127.0.0.1:{s.port}" for s in site.cluster.servers)
    cluster_url = f"nats://{nodes}?replicas=3&partitions={PARTITIONS}"
    edge_url = f"nats://127.0.0.1:{site.edge.port}?domain={DOMAIN}&replicas=3"
    command = ("worker", "examples.echo:handle", "--group", "echo")
    workers = [Running(*command, url=cluster_url)]
    try:
        await workers[0].aexpect("err", "of group 'echo' running")
        workers.append(Running(*command, url=edge_url))
        await workers[1].aexpect("err", "of group 'echo' running")
        opened = await asyncio.to_thread(run_cli, "sessions", "open", "from-the-edge",
                                         "--participant", "user", url=edge_url)
        assert opened.returncode == 0, opened.stderr
        sent = await asyncio.to_thread(run_cli, "send", "from-the-edge", "hi", "--wait", "30",
                                       url=edge_url)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.splitlines()[-1].endswith("echo -> user  echo: hi")
        listed = await asyncio.to_thread(run_cli, "sessions", "ls", url=cluster_url)
        assert listed.stdout.splitlines()[1].startswith("from-the-edge  active")
        for worker in workers:
            assert await asyncio.to_thread(worker.signal, signal.SIGTERM) == 0
    finally:
        for worker in workers:
            worker.stop()
