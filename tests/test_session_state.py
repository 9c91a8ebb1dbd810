"""The session record is the authority: forged, missed and reopened closes, unowned envelopes.

Each test prints the figure the control-plane issue measured (how many
envelopes ran or were dropped) beside what it asserts.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import waiting
from faults.proxy import LinkProxy
from sessionbus.bus import ClosedEvent, SessionBus
from sessionbus.bus._server import NatsServer
from sessionbus.bus.manager import replace_session
from sessionbus.schemas import Envelope, SessionState, encode
from sessionbus.workers import DEAD_REASON_HEADER, Turn, Worker
from worker_proc import FAST

from sessionbus.testing import BusFactory

WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def sb(nats_server: NatsServer, bus_factory: BusFactory) -> SessionBus:
    return await bus_factory(nats_server.url, partitions=4)


@pytest.fixture
async def start_worker(bus_factory: BusFactory, nats_server: NatsServer
                       ) -> AsyncIterator[WorkerFactory]:
    """Start a worker of group ``g`` on its own bus (``url`` overrides the server's)."""
    workers: list[Worker] = []

    async def make(handler: Any, *, url: str | None = None, **kwargs: Any) -> Worker:
        wbus = await bus_factory(url or nats_server.url, partitions=4)
        worker = Worker(wbus, group="g", handler=handler,
                        config=kwargs.pop("config", FAST), **kwargs)
        await worker.start()
        workers.append(worker)
        await until(lambda: len(worker.partitions) == 4, "partitions pulled")
        return worker

    yield make
    for worker in workers:
        await worker.stop()


until = functools.partial(waiting.until, within=15.0, every=0.01)


async def waited(cond: Callable[[], bool], within: float) -> bool:
    """Like :func:`until` but returns False on timeout (so a figure can be printed first)."""
    try:
        await until(cond, "", within=within)
    except AssertionError:
        return False
    return True


def recorder() -> tuple[list[tuple[str, int, float]], Callable[[Turn], Awaitable[None]]]:
    """A handler that logs ``(session, idx, start time)`` and takes ``event_data['sleep']``."""
    ran: list[tuple[str, int, float]] = []

    async def handle(turn: Turn) -> None:
        data = turn.envelope.event_data
        ran.append((turn.session_id, int(data.get("idx", -1)), time.time()))
        await asyncio.sleep(float(data.get("sleep", 0)))

    return ran, handle


async def send_n(sb: SessionBus, sid: str, n: int, *, start: int = 0, sleep: float = 0.0
                 ) -> None:
    s = sb.session(sid, participant="client")
    for i in range(start, start + n):
        await s.send(event_data={"idx": i, "sleep": sleep}, event_type="work")


async def dead_reasons(sb: SessionBus, count: int, within: float = 10.0) -> list[str]:
    """The reasons of the first ``count`` dead letters of group ``g``."""
    deadline = time.monotonic() + within
    while True:
        info = await sb.js.stream_info(sb.names.dead_letter_stream)
        if info.state.messages >= count or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    reasons = []
    for seq in range(1, info.state.messages + 1):
        msg = await sb.js.get_msg(sb.names.dead_letter_stream, seq)
        reasons.append((msg.headers or {}).get(DEAD_REASON_HEADER, ""))
    return reasons


# -- 1. a forged close ------------------------------------------------------------


async def test_a_forged_close_drops_nothing(sb: SessionBus, start_worker: WorkerFactory,
                                            bus_factory: BusFactory,
                                            nats_server: NatsServer) -> None:
    ran, handle = recorder()
    await start_worker(handle)
    await sb.open("victim", participant="client")
    await send_n(sb, "victim", 6, sleep=0.1)
    await until(lambda: len(ran) >= 1, "the first turn")
    # Garbage, then a well-formed close event: neither is backed by the record.
    await sb.nc.publish(sb.names.closed("victim"), b"\x00garbage")
    forged = ClosedEvent("victim", SessionState.CLOSED, "forged", time.time(), 999)
    await sb.nc.publish(sb.names.closed("victim"), forged.to_wire())
    await sb.nc.flush()
    await waited(lambda: len(ran) == 6, within=5)
    await send_n(sb, "victim", 3, start=6)
    await waited(lambda: len(ran) == 9, within=5)
    # A client that heard the forged close still sends into the active session.
    other = await bus_factory(nats_server.url, partitions=4)
    handle_other = other.session("victim", participant="client")
    hints = other.lifecycle.states.hints
    await other.nc.publish(other.names.closed("victim"), forged.to_wire())
    await until(lambda: other.lifecycle.states.hints > hints, "the forged close")
    await asyncio.sleep(0.2)  # and whatever it might make the client do meanwhile
    refused = handle_other.is_terminal()
    if not refused:
        await handle_other.send(event_data={"idx": 9}, event_type="work")
        await waited(lambda: len(ran) == 10, within=5)
    print(f"forged close: {len(ran)} of 10 envelopes ran; client refused sends: {refused}")
    assert not refused
    assert [i for _, i, _ in ran] == list(range(10))
    assert (await sb.session("victim").info()).state is SessionState.ACTIVE


# -- 2. a missed close ------------------------------------------------------------


async def test_a_close_missed_while_disconnected_is_enforced(
    sb: SessionBus, start_worker: WorkerFactory, nats_server: NatsServer
) -> None:
    ran, handle = recorder()
    with LinkProxy(target_port=nats_server.port) as proxy:
        worker = await start_worker(handle, url=proxy.url, config=FAST.replace(lease_ttl=10))
        await sb.open("cut-off", participant="client")
        await send_n(sb, "cut-off", 8, sleep=0.4)
        await until(lambda: len(ran) >= 1, "the first turn")
        proxy.cut()
        await sb.session("cut-off").close("while the worker was away")
        closed_at = time.time()
        await asyncio.sleep(3.0)
        proxy.restore()
        # Reconnected, the worker settles the rest (without running them).
        await waited(lambda: worker.scheduler.completed == 8, within=10)
        await worker.stop()  # while its link is still there
        await worker.bus.close()
    after = [i for _, i, at in ran if at > closed_at]
    print(f"missed close (3 s cut): {len(after)} envelopes ran after the close, "
          f"{worker.scheduler.completed} of 8 settled")
    assert after == []
    assert worker.scheduler.completed == 8


async def test_a_close_before_the_worker_started_is_enforced(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    ran, handle = recorder()
    first = await start_worker(handle)
    await sb.open("restarted", participant="client")
    await first.stop()  # dead at the close
    await send_n(sb, "restarted", 10)
    await sb.session("restarted").close()
    await sb.open("never-served", participant="client")
    await send_n(sb, "never-served", 5)
    await sb.session("never-served").close()
    second = await start_worker(handle)  # a fresh process: its own bus
    await waited(lambda: second.scheduler.completed == 15, within=15)
    print(f"closed before a worker ran: {len(ran)} of 15 envelopes ran")
    assert ran == []


# -- 3. a reopened id -------------------------------------------------------------


async def test_a_reopened_session_is_served_at_once(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    ran, handle = recorder()
    await start_worker(handle)
    await sb.open("again", participant="client")
    await send_n(sb, "again", 2)
    await until(lambda: len(ran) == 2, "two turns")
    await sb.session("again").close()
    await replace_session(sb, "again", ttl=None, reason="reopened")
    started = time.monotonic()
    await send_n(sb, "again", 3, start=2)
    await waited(lambda: len(ran) == 5, within=5)
    took = time.monotonic() - started
    print(f"reopened id: {len(ran) - 2} of 3 envelopes ran within {took:.2f} s")
    assert len(ran) == 5 and took < 5


# -- 5. envelopes no session owns -------------------------------------------------


async def test_unowned_and_misaddressed_envelopes_are_dead_lettered(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    ran, handle = recorder()
    await start_worker(handle)
    await sb.open("owned", participant="client")
    never = Envelope(session_id="never-opened", sender_id="x", event_type="work",
                     event_data={"idx": 0})
    await sb.js.publish(sb.names.inbound("never-opened"), encode(never))
    elsewhere = Envelope(session_id="someone-else", sender_id="x", event_type="work",
                         event_data={"idx": 1})
    await sb.js.publish(sb.names.inbound("owned"), encode(elsewhere))
    # An alias of 'a.b' ('=YS5i' is its only token) and an empty id.
    await sb.open("a.b", participant="client")
    alias = Envelope(session_id="a.b", sender_id="x", event_type="work",
                     event_data={"idx": 2})
    await sb.js.publish(f"{sb.names.prefix}.in.=YS5i!!", encode(alias))
    await sb.js.publish(f"{sb.names.prefix}.in.=!!", encode(alias))
    reasons = await dead_reasons(sb, 4, within=3)
    await send_n(sb, "owned", 1, start=3)
    await waited(lambda: 3 in [i for _, i, _ in ran], within=5)
    print(f"unowned/misaddressed/alias: {len(ran) - 1} of 4 ran, {len(reasons)} dead-lettered")
    print(f"  reasons: {reasons}")
    assert [i for _, i, _ in ran] == [3]
    assert len(reasons) == 4, reasons
    assert any("does not exist" in r for r in reasons), reasons
    assert any("names session 'someone-else'" in r for r in reasons), reasons
    assert sum("canonical encoding" in r for r in reasons) == 2, reasons
