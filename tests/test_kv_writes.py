"""Bucket writes on the shared reply inbox: acks, conflicts, and the failures they translate."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest
from nats.aio.msg import Msg
from pausing import paused_until_logged, stream_leader
from sessionbus.bus import SessionBus
from sessionbus.bus._kv import Bucket
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.bus.errors import BusTimeout, ConnectionFailed, KeyConflict
from sessionbus.workers import Turn, Worker, WorkerConfig
from sessionbus.workers._membership import Lease, Membership
from waiting import sigstop, until

from sessionbus.testing import BusFactory


async def test_concurrent_writes_each_get_their_own_ack(bus: SessionBus) -> None:
    kv = bus.sessions_kv
    revisions = await asyncio.gather(*(kv.put(f"w.{i}", b"%d" % i) for i in range(50)))
    assert len(set(revisions)) == 50
    for i, revision in enumerate(revisions):
        entry = await kv.get(f"w.{i}")
        assert entry is not None and entry.revision == revision and entry.value == b"%d" % i
    with pytest.raises(KeyConflict) as caught:
        await kv.update("w.0", b"stale", last=revisions[0] - 1)
    assert caught.value.expected == revisions[0] - 1
    published: list[str] = []

    async def also() -> None:
        published.append("after the write, before its ack")

    assert await kv.update("w.0", b"fresh", last=revisions[0], also=also) > revisions[0]
    assert published == ["after the write, before its ack"]


async def test_a_write_nobody_answers_fails_typed(bus: SessionBus) -> None:
    missing = Bucket(nc=bus.nc, js=bus.js, name="absent", timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ConnectionFailed):  # no stream: no responders, sent again till timeout
        await missing.put("k", b"v")
    assert 0.5 <= time.monotonic() - start < 3.0
    # A subscriber that never replies stands in for a stream that went silent.
    silent = await bus.nc.subscribe("$KV.silent.>")
    try:
        quiet = Bucket(nc=bus.nc, js=bus.js, name="silent", timeout=0.3)
        start = time.monotonic()
        with pytest.raises(BusTimeout):
            await quiet.put("k", b"v")
        assert 0.25 <= time.monotonic() - start < 3.0
        got: Msg = await silent.next_msg(timeout=1)
        assert got.data == b"v" and got.reply
        # Unanswered, it may have been stored: it is not sent again.
        await bus.nc.flush()
        assert silent.pending_msgs == 0
    finally:
        await silent.unsubscribe()


#: Seconds a request may take in the election tests (nats-server waits a few
#: seconds without heartbeats before its replicas elect a new leader).
_ELECTION = 15.0


async def _route_gone(survivor: NatsServer, victim: NatsServer) -> None:
    """Wait until ``survivor`` has dropped its routes to the killed ``victim``.

    Until then it forwards writes to the dead leader, where they are never
    answered (and so, rightly, not sent again).
    """
    def routed() -> bool:
        routes = survivor.monitor("routez").get("routes") or []
        return any(r.get("remote_name") == victim.name for r in routes)

    await until(lambda: not routed(), "the route to the killed node to close")


async def test_writes_ride_out_the_election_of_a_new_stream_leader(
    nats_cluster: NatsCluster, bus_factory: BusFactory,
) -> None:
    first = await bus_factory(nats_cluster.urls, replicas=3)
    kv = first.sessions_kv
    revision = await kv.put("steady", b"0")
    info = await first.js.stream_info(kv.stream)
    assert info.cluster is not None
    victim = next(s for s in nats_cluster.servers if s.name == info.cluster.leader)
    survivor = next(s for s in nats_cluster.servers if s is not victim)
    # Through a node that stays up: only the stream's leader goes away. An
    # election after a SIGKILL can take longer than the default timeout.
    sb = await bus_factory(survivor.url, replicas=3, request_timeout=_ELECTION)
    kv = sb.sessions_kv
    victim.kill()
    await _route_gone(survivor, victim)
    slowest = 0.0
    written = []
    for i in range(20):
        start = time.monotonic()
        # While no replica leads, nothing takes the write ("no responders"):
        # it is sent again until one does, within the bucket's timeout.
        written.append(await kv.create(f"k.{i}", b"%d" % i))
        revision = await kv.update("steady", b"%d" % (i + 1), last=revision)
        slowest = max(slowest, time.monotonic() - start)
    # The first write waited for the election (seconds), well within the timeout.
    assert 0.5 < slowest < kv.timeout
    for i in range(20):
        entry = await kv.get(f"k.{i}")
        assert entry is not None and entry.value == b"%d" % i and entry.revision == written[i]
    steady = await kv.get("steady")
    assert steady is not None and steady.value == b"20" and steady.revision == revision


async def _lease_leader(
    cluster: NatsCluster, bus_factory: BusFactory,
) -> tuple[NatsServer, NatsServer]:
    """The node leading the worker lease bucket's stream, and another node."""
    first = await bus_factory(cluster.urls, replicas=3)
    return await stream_leader(cluster, first, first.workers_kv.stream)


async def test_a_worker_starting_during_an_election_joins(
    nats_cluster: NatsCluster, bus_factory: BusFactory,
) -> None:
    victim, survivor = await _lease_leader(nats_cluster, bus_factory)
    sb = await bus_factory(survivor.url, replicas=3, request_timeout=_ELECTION)

    async def handle(turn: Turn) -> None:
        pass

    victim.kill()
    await _route_gone(survivor, victim)
    worker = Worker(sb, group="g", handler=handle, worker_id="w-election")
    await worker.start()
    try:
        lease = await sb.workers_kv.get(sb.names.worker_key("g", "w-election"))
        assert lease is not None
    finally:
        await worker.stop()


async def test_a_worker_joins_while_its_lease_streams_leader_is_paused(
    nats_cluster: NatsCluster, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    leader, survivor = await _lease_leader(nats_cluster, bus_factory)
    # Given longer than an election: the other replicas elect a new leader
    # 5-10 s after the pause here.
    sb = await bus_factory(survivor.url, replicas=3, request_timeout=_ELECTION)

    async def handle(turn: Turn) -> None:
        pass

    # The lease write either reaches the paused leader, which keeps its
    # routes, and gets no answer (written again after the request timeout),
    # or finds no stream taking it once the leader is given up ("no
    # responders": written again until a new leader takes it). Both happen.
    assert leader.pid is not None
    try:
        await sigstop(leader.pid)
        worker = Worker(sb, group="g", handler=handle, worker_id="w-paused")
        with caplog.at_level(logging.WARNING, logger="sessionbus"):
            await worker.start()
    finally:
        os.kill(leader.pid, signal.SIGCONT)
    try:
        held = worker.membership.lease
        key = sb.names.worker_key("g", "w-paused")

        # A replica that was paused answers reads from what it had until it
        # has caught up: read until the lease shows.
        deadline = time.monotonic() + 10.0
        while True:
            entry = await sb.workers_kv.get(key)
            lease = None if entry is None else Lease.decode(entry.value)
            if lease is not None and lease.started_at == held.started_at:
                break
            assert time.monotonic() < deadline, f"the lease read back is {lease}"
            await asyncio.sleep(0.05)
        assert lease.node_id == sb.node_id and lease.worker_id == "w-paused"
        # Nothing worse than a warning while the stream elected its leader.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await worker.stop()


async def test_a_lease_stored_by_an_attempt_whose_answer_was_lost_is_the_workers_own(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    sb = await bus_factory(nats_server.url, request_timeout=1.0)
    membership = Membership(sb, group="g", worker_id="w-lost-answer", config=WorkerConfig())
    start = time.monotonic()
    async with paused_until_logged(nats_server, "got no answer; writing it again") as resume:
        await membership.join()
    joined = time.monotonic() - start
    try:
        assert resume.resumed  # the first write was stored after its wait ended
        # Taken over at once: not waited out as another process's lease would be.
        assert joined < WorkerConfig().lease_ttl
        entry = await sb.workers_kv.get(sb.names.worker_key("g", "w-lost-answer"))
        assert entry is not None and entry.revision > 1  # created, then taken over as its own
        assert Lease.decode(entry.value) == membership.lease
    finally:
        await membership.leave()
