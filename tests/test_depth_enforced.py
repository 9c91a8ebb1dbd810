"""Depth and envelope shape enforced by the bus, not only by a well-behaved client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._names import MSG_ID_HEADER
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import BusError, InvalidEnvelope
from sessionbus.schemas import Envelope, encode
from sessionbus.workers import DEAD_REASON_HEADER, Turn, Worker
from worker_proc import FAST

from sessionbus.testing import BusFactory


def nested(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


async def test_a_too_deeply_nested_event_is_a_typed_bus_error(bus: SessionBus) -> None:
    s = await bus.open("deep-data")
    with pytest.raises(InvalidEnvelope) as refused:
        await s.send(event_type="custom", event_data=nested(5_000))
    assert isinstance(refused.value, BusError)
    assert refused.value.session_id == "deep-data"
    assert [e async for e in s.history()] == []  # nothing was stored


# -- the worker refuses forged depths; replies take the depth it holds -------------------


@pytest.fixture
async def worker_bus(nats_server: NatsServer, bus_factory: BusFactory) -> SessionBus:
    return await bus_factory(nats_server.url, partitions=4)


async def until(cond: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_worker_dead_letters_forged_depths(
    nats_server: NatsServer, bus_factory: BusFactory, worker_bus: SessionBus
) -> None:
    client = await bus_factory(nats_server.url, partitions=4)
    ran: list[str] = []

    async def handle(turn: Turn) -> None:
        ran.append(turn.envelope.content)

    worker = Worker(worker_bus, group="g", handler=handle, config=FAST, only_addressed=False)
    await worker.start()
    try:
        s = await client.open("forged-depth", participant="user", max_depth=3)
        root = await s.send("root")
        one = await s.send("one", causation_id=root)
        two = await s.send("two", causation_id=one)
        assert await until(lambda: len(ran) == 3, 15)
        names = client.names
        lowered = Envelope(session_id="forged-depth", sender_id="liar", causation_id=two,
                           depth=0, event_data={"text": "lowered"})
        too_deep = Envelope(session_id="forged-depth", sender_id="liar", depth=99,
                            event_data={"text": "too deep"})
        for env in (lowered, too_deep):
            await client.js.publish(names.inbound("forged-depth"), encode(env),
                                    headers={MSG_ID_HEADER: env.envelope_id})
        await s.send("after", causation_id=two)
        await until(lambda: "after" in ran, 10)
        dead = await client.js.stream_info(names.dead_letter_stream)
        reasons = []
        for seq in range(1, dead.state.messages + 1):
            msg = await client.js.get_msg(names.dead_letter_stream, seq)
            reasons.append((msg.headers or {}).get(DEAD_REASON_HEADER, ""))
    finally:
        await worker.stop()
    forged_ran = [c for c in ran if c in ("lowered", "too deep")]
    print(f"forged depths: {len(forged_ran)} of 2 ran, {len(reasons)} dead-lettered: {reasons}")
    assert forged_ran == []
    assert ran == ["root", "one", "two", "after"]
    assert len(reasons) == 2
    assert "below its causation's depth + 1 (3)" in reasons[0]
    assert "over the session's max_depth 3" in reasons[1]


async def test_replies_take_the_depth_the_worker_holds(
    nats_server: NatsServer, bus_factory: BusFactory, worker_bus: SessionBus,
    depth_scans: list[str],
) -> None:
    client = await bus_factory(nats_server.url, partitions=4)
    replied: list[str] = []

    async def handle(turn: Turn) -> None:
        replied.append(await turn.reply(f"re: {turn.envelope.content}"))

    worker = Worker(worker_bus, group="g", handler=handle, config=FAST)
    await worker.start()
    try:
        s = await client.open("replies", participant="user", participants=["g"])
        for i in range(20):
            await s.send(f"q{i}")
            assert await until(lambda i=i: len(replied) == i + 1, 10)  # type: ignore[misc]
        depths = [e.depth async for e in s.history() if e.sender_id == "g"]
    finally:
        await worker.stop()
    print(f"20 replies: {len(depth_scans)} history scans")
    assert depths == [1] * 20
    assert depth_scans == []
