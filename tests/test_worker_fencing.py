"""Fencing: a turn run twice stores each reply once; a stale turn neither replies nor acks."""

from __future__ import annotations

import asyncio
import time

from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import WorkerError
from sessionbus.workers import Turn, Worker, WorkerConfig
from sessionbus.workers.turn import reply_key
from worker_proc import FAST

from sessionbus.testing import BusFactory


async def test_a_turn_run_again_stores_each_reply_once(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url, prefix="fr", partitions=2)
    session = await sb.open("twice", participants=["client", "g"], participant="client")
    attempts: list[int] = []
    done = asyncio.Event()

    async def handle(turn: Turn) -> None:
        attempts.append(turn.attempt)
        await turn.reply("first")
        await turn.reply("second")
        if turn.attempt == 1:
            raise RuntimeError("fail after replying: the turn runs again")
        done.set()

    worker = Worker(sb, group="g", handler=handle, config=FAST)
    await worker.start()
    try:
        await session.send("hello")
        await asyncio.wait_for(done.wait(), 15)
    finally:
        await worker.stop()
    assert attempts == [1, 2]
    history = [e async for e in session.history()]
    replies = [e for e in history if e.sender_id == "g"]
    assert [e.content for e in replies] == ["first", "second"]
    cause = history[0].envelope_id
    assert [e.idempotency_key for e in replies] == [reply_key(cause, "g", 0),
                                                   reply_key(cause, "g", 1)]

async def test_a_turn_stalled_past_the_fence_neither_replies_nor_acks(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url, prefix="fs", partitions=1)
    session = await sb.open("stall", participants=["client", "g"], participant="client")
    config: WorkerConfig = FAST
    outcomes: list[str] = []
    done = asyncio.Event()

    async def handle(turn: Turn) -> None:
        if turn.attempt == 1:
            # The whole event loop stops, as in SIGSTOP or a long GC pause.
            time.sleep(config.fence_after + 0.5)  # noqa: ASYNC251 - the point of the test
            try:
                await turn.reply("stale")
                outcomes.append("stale reply sent")
            except WorkerError:
                outcomes.append("stale reply refused")
            return  # returning would ack: the fence must stop that too
        await turn.reply("fresh")
        outcomes.append(f"ran again (attempt {turn.attempt})")
        done.set()

    worker = Worker(sb, group="g", handler=handle, config=config)
    await worker.start()
    try:
        await session.send("hello")
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await worker.stop()
    assert outcomes[0] == "stale reply refused"
    assert outcomes[-1].startswith("ran again")
    replies = [e.content async for e in session.history() if e.sender_id == "g"]
    assert replies == ["fresh"]
