"""Order across a handover: the previous owner's envelopes come back in any order.

nats-server redelivers a dead or paused owner's envelopes from a queue
that does not keep stream order (it comes out rotated when the next
puller was already waiting), so the next owner must hold them all before
it starts a turn. These tests make the previous owner a raw client or a
SIGKILLed worker process and check each session's turns against send
order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._jsapi import PinnedPuller, create_pinned_consumer
from sessionbus.bus._server import NatsServer
from sessionbus.workers import Turn, Worker
from worker_proc import (
    FAST,
    check_history,
    duplicates,
    ensure_sessions,
    envelope,
    publish_many,
    read_records,
)

from sessionbus.testing import BusFactory

SCRIPT = str(Path(__file__).with_name("worker_proc.py"))


@pytest.mark.parametrize(("sessions", "per", "max_held"), [(3, 4, 8192), (30, 10, 40)],
                         ids=["few", "more-than-max-held"])
async def test_a_dead_owners_envelopes_run_in_stream_order(
    nats_server: NatsServer, bus_factory: BusFactory, sessions: int, per: int, max_held: int,
) -> None:
    sb = await bus_factory(nats_server.url, prefix="ho", partitions=1)
    sids = [f"s{i}" for i in range(sessions)]
    total = sessions * per
    await ensure_sessions(sb, sids)
    await publish_many(sb, [envelope(sid, idx) for idx in range(per) for sid in sids])
    # A previous owner pulls everything pinned, keeps it in progress, then dies.
    await create_pinned_consumer(
        sb.nc, stream=sb.names.envelope_stream, name=sb.names.worker_consumer("g", 0),
        filter_subject=sb.names.partition_filter(0), group=sb.names.worker_priority_group,
        ack_wait=FAST.ack_wait, priority_timeout=FAST.priority_timeout,
        max_ack_pending=FAST.max_ack_pending,
    )
    dead = await nats.connect(nats_server.url)
    puller = PinnedPuller(dead, stream=sb.names.envelope_stream,
                          consumer=sb.names.worker_consumer("g", 0),
                          group=sb.names.worker_priority_group)
    await puller.start()
    held = 0
    for _ in range(10):  # a loaded server may answer one pull with part of it
        held += len(await puller.fetch(total - held, 1.0))
        if held == total:
            break
    assert held == total
    await dead.close()

    seen: dict[str, list[int]] = {sid: [] for sid in sids}
    done = asyncio.Event()

    async def handle(turn: Turn) -> None:
        seen[turn.session_id].append(turn.envelope.event_data["idx"])
        if sum(map(len, seen.values())) >= total:
            done.set()

    # Fewer held than the dead owner left: the catch-up still sees them all.
    worker = Worker(sb, group="g", handler=handle, config=FAST.replace(max_held=max_held))
    await worker.start()
    try:
        await asyncio.wait_for(done.wait(), 20)
        await asyncio.sleep(0.3)  # a turn run twice would show up here
    finally:
        await worker.stop()
    assert seen == {sid: list(range(per)) for sid in sids}


class _Proc:
    def __init__(self, url: str, tmp: Path, worker_id: str, timings: str) -> None:
        err = open(tmp / f"{worker_id}-{time.monotonic_ns()}.err", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--url", url, "--prefix", "ow", "--group", "g",
             "--worker-id", worker_id, "--log", str(tmp / "log.jsonl"), "--sleep", "0.2",
             "--timings", timings],
            stdout=err, stderr=subprocess.STDOUT,
        )
        err.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def spawned() -> Iterator[list[_Proc]]:
    procs: list[_Proc] = []
    yield procs
    for p in procs:
        p.kill()


@pytest.mark.parametrize("same_id", [False, True], ids=["new-id", "same-id"])
async def test_only_worker_killed_mid_turn_and_restarted_keeps_order(
    nats_server: NatsServer, bus_factory: BusFactory, tmp_path: Path, spawned: list[_Proc],
    same_id: bool,
) -> None:
    sessions, per = 20, 5
    sb: SessionBus = await bus_factory(nats_server.url, prefix="ow", partitions=4)
    log = tmp_path / "log.jsonl"
    spawned.append(_Proc(nats_server.url, tmp_path, "w0", "fast"))
    await asyncio.sleep(0)
    deadline = time.monotonic() + 20
    while len(await sb.workers_kv.list(sb.names.worker_group_filter("g"))) < 1:
        assert time.monotonic() < deadline, "worker never joined"
        await asyncio.sleep(0.05)
    await publish_many(sb, [envelope(f"s{s:02d}", i) for i in range(per) for s in range(sessions)])
    while not log.exists() or log.read_bytes().count(b"\n") < sessions * 2:
        assert time.monotonic() < deadline, "turns never ran"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # mid-turn
    spawned[0].kill()
    killed_at = time.time()
    await asyncio.sleep(1.0)
    spawned.append(_Proc(nats_server.url, tmp_path, "w0" if same_id else "w1", "fast"))
    deadline = time.monotonic() + 30
    while len({(r.sid, r.idx) for r in read_records([str(log)])}) < sessions * per:
        assert time.monotonic() < deadline, "not everything ran after the restart"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    records = read_records([str(log)])
    problems = check_history(records, sessions=sessions, per_session=per)
    assert not problems, "\n".join(problems)
    for key, recs in duplicates(records).items():
        # Only a turn cut by the kill may run again (its ack never left).
        assert len(recs) == 2 and min(r.end for r in recs) >= killed_at - 0.5, (key, recs)


async def test_a_worker_whose_lease_write_was_lost_rejoins_at_once(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    # A server restart can lose the lease's latest refresh: the stored key then
    # holds an older write of the same lease, and the worker's next
    # compare-and-set fails. It must take its own key back, not wait for a
    # TTL that may never come, and pull its partitions again.
    sb = await bus_factory(nats_server.url, prefix="lw", partitions=4)
    ran = asyncio.Event()

    async def handle(turn: Turn) -> None:
        ran.set()

    worker = Worker(sb, group="g", handler=handle, config=FAST)
    await worker.start()
    try:
        deadline = time.monotonic() + 15
        while len(worker.partitions) < 4:
            assert time.monotonic() < deadline, "never pulled its partitions"
            await asyncio.sleep(0.05)
        key = sb.names.worker_key("g", worker.worker_id)
        entry = await sb.workers_kv.get(key)
        assert entry is not None
        await sb.workers_kv.put(key, entry.value)  # another revision, no TTL
        deadline = time.monotonic() + 15
        while not worker.membership.lost.is_set():
            assert time.monotonic() < deadline, "the lost write was never noticed"
            await asyncio.sleep(0.02)
        while worker.membership.lost.is_set() or len(worker.partitions) < 4:
            assert time.monotonic() < deadline, "the worker never rejoined"
            await asyncio.sleep(0.05)
        await publish_many(sb, [envelope("after", 0)])
        await asyncio.wait_for(ran.wait(), 10)
    finally:
        await worker.stop()
