"""Several workers of a group in one process: handover on drain and stop, leaf-node workers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Callable

from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsServer
from sessionbus.workers import Handler, Turn, Worker
from sessionbus.workers._assignment import assign
from worker_proc import FAST, envelope, poll, publish_many

from sessionbus.testing import BusFactory, LeafTopology

Span = tuple[int, float, float, str, int]  # idx, start, end, worker, attempt


class Recorder:
    """A handler that records every turn, per session, with the worker that ran it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.spans: dict[str, list[Span]] = defaultdict(list)
        self.delay = delay

    def handler(self, name: str) -> Handler:
        async def handle(turn: Turn) -> None:
            start = time.monotonic()
            if self.delay:
                await asyncio.sleep(self.delay)
            self.spans[turn.session_id].append(
                (turn.envelope.event_data["idx"], start, time.monotonic(), name, turn.attempt))

        return handle

    def count(self) -> int:
        return sum(map(len, self.spans.values()))

    def check(self, sessions: int, per_session: int, *, exactly_once: bool) -> None:
        assert len(self.spans) == sessions
        for sid, spans in self.spans.items():
            idxs = [s[0] for s in spans]
            if exactly_once:
                assert idxs == list(range(per_session)), f"{sid}: {idxs}"
            else:
                assert sorted(set(idxs)) == list(range(per_session)), f"{sid}: {idxs}"
                assert idxs == sorted(idxs), f"{sid}: {idxs}"
            for a, b in itertools.pairwise(spans):
                assert a[2] <= b[1], f"{sid}: {a} overlaps {b}"


async def wait_until(cond: Callable[[], bool], what: str, within: float = 30.0) -> None:
    async def check() -> bool:
        return cond()

    if not await poll(check, bool, within=within, every=0.01):
        raise AssertionError(f"timed out waiting for {what}")


async def test_drain_hands_partitions_over_in_order_without_reruns(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb_a = await bus_factory(nats_server.url, partitions=8)
    sb_b = await bus_factory(nats_server.url, partitions=8)
    rec = Recorder(delay=0.002)
    a = Worker(sb_a, group="g", handler=rec.handler("a"), worker_id="a", config=FAST)
    b = Worker(sb_b, group="g", handler=rec.handler("b"), worker_id="b", config=FAST)
    await a.start()
    await b.start()
    shares = assign(8, ["a", "b"])
    await wait_until(lambda: a.partitions == shares["a"] and b.partitions == shares["b"],
                     "partitions split")

    async def traffic() -> None:
        for idx in range(10):
            await publish_many(sb_a, [envelope(f"s{s}", idx) for s in range(100)])
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(traffic())
    await wait_until(lambda: rec.count() >= 300, "some turns")
    await a.drain()
    await wait_until(lambda: b.partitions == frozenset(range(8)), "b owns everything")
    await sender
    await wait_until(lambda: rec.count() >= 1000, "every envelope")
    rec.check(100, 10, exactly_once=True)
    assert {s[3] for spans in rec.spans.values() for s in spans} == {"a", "b"}
    await b.drain()


async def test_stop_hands_back_a_cancelled_turn_to_the_next_owner(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb_a = await bus_factory(nats_server.url, partitions=4)
    sb_b = await bus_factory(nats_server.url, partitions=4)
    started = asyncio.Event()
    seen: list[tuple[str, int, int]] = []

    async def slow(turn: Turn) -> None:
        seen.append(("a", turn.envelope.event_data["idx"], turn.attempt))
        started.set()
        await asyncio.sleep(30)

    async def fast(turn: Turn) -> None:
        seen.append(("b", turn.envelope.event_data["idx"], turn.attempt))

    a = Worker(sb_a, group="g", handler=slow, worker_id="a", config=FAST)
    await a.start()
    await wait_until(lambda: len(a.partitions) == 4, "a owns everything")
    await publish_many(sb_a, [envelope("x", i) for i in range(3)])
    await asyncio.wait_for(started.wait(), 10)
    b = Worker(sb_b, group="g", handler=fast, worker_id="b", config=FAST)
    await b.start()
    t0 = time.monotonic()
    await a.stop()  # cancels the running turn and hands everything back at once
    assert time.monotonic() - t0 < 5
    await wait_until(lambda: len(seen) == 4, "the handed-back envelopes")
    assert seen == [("a", 0, 1), ("b", 0, 2), ("b", 1, 2), ("b", 2, 2)]
    await b.drain()


async def test_a_worker_on_a_leaf_node_serves_the_hub(
    nats_leaf: LeafTopology, bus_factory: BusFactory
) -> None:
    hub = await bus_factory(nats_leaf.hub.url, partitions=4)
    edge: SessionBus = await bus_factory(nats_leaf.leaf.url, domain=nats_leaf.domain)
    assert edge.partitions == 4 and edge.api_prefix == f"$JS.{nats_leaf.domain}.API"
    rec = Recorder()
    worker = Worker(edge, group="edge", handler=rec.handler("edge"), config=FAST)
    await worker.start()
    await wait_until(lambda: len(worker.partitions) == 4, "the leaf worker pulls")
    await publish_many(hub, [envelope(f"s{s}", i) for i in range(5) for s in range(10)])
    await wait_until(lambda: rec.count() == 50, "every envelope")
    rec.check(10, 5, exactly_once=True)
    await worker.drain()
    assert await hub.workers_kv.list(hub.names.worker_group_filter("edge")) == []
