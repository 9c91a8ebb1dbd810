"""A lease written by something that is not a live worker cannot stall a group for long."""

from __future__ import annotations

import asyncio
import contextlib
import time

from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsServer
from sessionbus.workers import Turn, Worker
from sessionbus.workers._membership import Lease
from worker_proc import FAST

from sessionbus.testing import BusFactory


async def test_a_forged_lease_is_ignored_after_the_bound(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb: SessionBus = await bus_factory(nats_server.url, partitions=8)
    ran: set[str] = set()
    all_ran = asyncio.Event()

    async def handle(turn: Turn) -> None:
        ran.add(turn.session_id)
        if len(ran) == 40:
            all_ran.set()

    workers = []
    for i in range(2):
        wbus = await bus_factory(nats_server.url, partitions=8)
        worker = Worker(wbus, group="g", handler=handle, worker_id=f"w{i}", config=FAST)
        await worker.start()
        workers.append(worker)
    sessions = [await sb.open(f"canary-{i}", participant="client") for i in range(40)]

    async def forge() -> None:
        # A client rewriting one key every second: a member claiming every partition.
        key = sb.names.worker_key("g", "fake")
        while True:
            lease = Lease(worker_id="fake", node_id="nowhere", claims=frozenset(range(8)),
                          started_at=time.time(), expires_at=time.time() + 2)
            await sb.workers_kv.put(key, lease.encode(), ttl=2)
            await asyncio.sleep(1.0)

    forger = asyncio.create_task(forge())
    started = time.monotonic()
    try:
        await asyncio.sleep(0.5)
        for s in sessions:  # 40 canaries over 4 s
            await s.send("canary")
            await asyncio.sleep(0.1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_ran.wait(), started + 12.0 - time.monotonic())
        took = time.monotonic() - started
    finally:
        forger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forger
        for worker in workers:
            await worker.stop()
    print(f"forged lease: {len(ran)} of {len(sessions)} canary turns ran in {took:.1f} s")
    assert len(ran) == len(sessions)
