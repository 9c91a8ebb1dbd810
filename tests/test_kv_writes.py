"""Bucket writes on the shared reply inbox: acks, conflicts, and the failures they translate."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.msg import Msg
from sessionbus.bus import SessionBus
from sessionbus.bus._kv import Bucket
from sessionbus.bus.errors import BusTimeout, ConnectionFailed, KeyConflict


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
    with pytest.raises(ConnectionFailed):  # no stream: no responders, at once
        await missing.put("k", b"v")
    # A subscriber that never replies stands in for a stream that went silent.
    silent = await bus.nc.subscribe("$KV.silent.>")
    try:
        quiet = Bucket(nc=bus.nc, js=bus.js, name="silent", timeout=0.3)
        start = time.monotonic()
        with pytest.raises(BusTimeout):
            await quiet.put("k", b"v")
        assert 0.25 <= time.monotonic() - start < 2.0
        got: Msg = await silent.next_msg(timeout=1)
        assert got.data == b"v" and got.reply
    finally:
        await silent.unsubscribe()
