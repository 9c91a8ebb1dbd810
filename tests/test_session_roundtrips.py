"""Round trips of the record paths: a close from the known record, many first reads at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._kv import Bucket
from sessionbus.bus._server import NatsServer
from sessionbus.schemas import SessionState, TaskState

from sessionbus.testing import BusFactory


class Counted:
    """Counts the single-key reads and the multi-key reads a bucket makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, bucket: Bucket) -> None:
        self.gets = 0
        self.batches: list[int] = []
        get, get_many = bucket.get, bucket.get_many

        async def counted_get(key: str) -> Any:
            self.gets += 1
            return await get(key)

        async def counted_get_many(keys: list[str]) -> Any:
            self.batches.append(len(keys))
            return await get_many(keys)

        monkeypatch.setattr(bucket, "get", counted_get)
        monkeypatch.setattr(bucket, "get_many", counted_get_many)


async def test_a_close_from_the_known_record_reads_nothing(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await bus.open("one-trip", participant="alice")
    counted = Counted(monkeypatch, bus.sessions_kv)
    meta = await s.close("done")
    assert meta.state is SessionState.CLOSED
    assert counted.gets == 0
    stored = await bus.session("one-trip").info()
    assert stored.state is SessionState.CLOSED and stored.close_reason == "done"


async def test_a_close_from_a_stale_record_keeps_the_newer_write(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The other bus changes the record after this one noted it: the close
    # must fail its compare-and-set, read, and keep (and expire) the new task.
    other = await bus_factory(nats_server.url)
    s = await bus.open("stale-copy", participant="alice")
    task = await other.session("stale-copy").add_task("agent-a")
    counted = Counted(monkeypatch, bus.sessions_kv)
    meta = await s.close("done")
    assert counted.gets == 1
    assert meta.state is SessionState.CLOSED
    assert meta.tasks[task.task_id].state is TaskState.EXPIRED
    stored = await other.session("stale-copy").info()
    assert stored.tasks[task.task_id].state is TaskState.EXPIRED


async def test_concurrent_first_reads_share_one_direct_get(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(300):
        await bus.open(f"many-{i}", participant="alice")
    await bus.session("many-7").close("gone")
    reader = await bus_factory(nats_server.url)
    states = reader.lifecycle.states
    counted = Counted(monkeypatch, reader.sessions_kv)
    wanted = [f"many-{i}" for i in range(300)] + ["never-opened"]
    known = await asyncio.gather(*(states.read(sid) for sid in wanted))
    assert sorted(counted.batches) == [45, 256]  # 301 reads in two requests
    assert counted.gets == 0
    by_id = {k.session_id: k for k in known}
    assert len(by_id) == 301
    assert by_id["many-7"].meta is not None and not by_id["many-7"].active
    assert by_id["never-opened"].meta is None
    assert all(by_id[f"many-{i}"].active for i in range(300) if i != 7)
    # One read alone is still a plain get.
    states.forget("many-3")
    assert (await states.read("many-3")).active
    assert counted.gets == 1
