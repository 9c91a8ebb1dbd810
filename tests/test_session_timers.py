"""Idle timers written without their ack: repairs that fail, a closing bus, refused opens.

A timer is lost for real here: the sessions bucket's stream is limited to
the messages it holds plus one, so an open stores its record and the server
rejects the timer that follows it (a rejected publish without a reply is
gone, as a write lost in a leader change is). Lifting the limit lets
writes through again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsServer
from sessionbus.bus._timers import REPAIR_CONCURRENCY, timer_seconds
from sessionbus.bus.errors import SessionExists
from sessionbus.schemas import SessionState
from waiting import until

from sessionbus.testing import BusFactory


async def warmed(bus: SessionBus) -> SessionBus:
    """``bus`` once its opens take the path that does not wait for the timer's ack."""
    await bus.open(f"warm-{time.monotonic_ns()}", ttl=600)
    assert bus.lifecycle.timers.can_skip_ack(watching=True)
    return bus


@asynccontextmanager
async def writes_refused(bus: SessionBus, *, allow: int = 0) -> AsyncIterator[None]:
    """The sessions stream takes ``allow`` more messages, then refuses writes, until exit."""
    stream = bus.sessions_kv.stream
    info = await bus.js.stream_info(stream)
    limited = dataclasses.replace(info.config, max_msgs=info.state.messages + allow)
    await bus.js.update_stream(limited)
    try:
        yield
    finally:
        await bus.js.update_stream(info.config)


async def timer_ttl(bus: SessionBus, session_id: str) -> str | None:
    """The ``Nats-TTL`` the session's stored timer was written with (None: no timer)."""
    if await bus.sessions_kv.get(bus.names.session_timer_key(session_id)) is None:
        return None
    msg = await bus.js.get_last_msg(bus.sessions_kv.stream,
                                    bus.sessions_kv.subject(bus.names.session_timer_key(session_id)))
    return (msg.headers or {}).get("Nats-TTL")


async def test_a_repair_that_fails_is_tried_again(
    bus: SessionBus, caplog: pytest.LogCaptureFixture
) -> None:
    await warmed(bus)
    timers = bus.lifecycle.timers
    timers.confirm_within = 0.3
    with caplog.at_level(logging.WARNING, logger="sessionbus.bus._timers"):
        async with writes_refused(bus, allow=1):  # the record, not its timer
            await bus.open("unlucky", ttl=1)
            assert timers.unconfirmed + timers.repaired == 1  # the sweep may have run already
            # The repair is refused too (as in an outage that outlasts it).
            await until(lambda: any("timer" in r.getMessage() for r in caplog.records),
                        "a refused repair")
    assert timers.repaired == 1
    event = await asyncio.wait_for(bus.session("unlucky").wait_closed(), 10)
    assert event.state is SessionState.EXPIRED and event.reason == "idle"
    assert timers.retried >= 1 and timers.repairing == 0


async def test_a_session_opened_as_its_bus_closes_still_expires(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    watcher = await bus_factory(nats_server.url)
    await watcher.start_lifecycle()
    opener = await warmed(await bus_factory(nats_server.url))
    async with writes_refused(opener, allow=1):
        await opener.open("last-minute", ttl=1)
    timers = opener.lifecycle.timers
    assert timers.unconfirmed == 1 and timers.repaired == 0
    started = time.monotonic()
    await opener.close()  # before the repair was due
    assert time.monotonic() - started < 4.5  # a few seconds at most
    event = await asyncio.wait_for(watcher.session("last-minute").wait_closed(), 10)
    assert event.state is SessionState.EXPIRED and event.reason == "idle"


async def test_a_closing_bus_waits_for_the_watcher_rather_than_write_again(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    opener = await warmed(await bus_factory(nats_server.url))
    timers = opener.lifecycle.timers
    await opener.open("on-time", ttl=600)
    await opener.close()  # its timer may not be confirmed yet: the watcher still sees it
    assert timers.repaired == 0 and timers.unconfirmed == 0
    reader = await bus_factory(nats_server.url)
    record = await reader.sessions_kv.get(reader.names.session_key("on-time"))
    timer = await reader.sessions_kv.get(reader.names.session_timer_key("on-time"))
    assert record is not None and timer is not None
    info = await reader.js.stream_info(reader.sessions_kv.stream)
    assert timer.revision == record.revision + 1 == info.state.last_seq  # written once
    assert await timer_ttl(reader, "on-time") == str(timer_seconds(600))


@pytest.mark.parametrize("acked_first", [False, True], ids=["unacked", "acked"])
async def test_a_refused_open_leaves_the_taken_sessions_timer_as_it_was(
    nats_server: NatsServer, bus_factory: BusFactory, acked_first: bool
) -> None:
    owner = await warmed(await bus_factory(nats_server.url, session_ttl=None))
    await owner.open("long", ttl=600)
    await owner.open("untimed")  # no idle TTL at all
    # A bus that never wrote a timer waits for both acks; a warmed one does not.
    racer = await bus_factory(nats_server.url)
    if not acked_first:
        await warmed(racer)
    for sid in ("long", "untimed"):
        with pytest.raises(SessionExists):
            await racer.open(sid, ttl=1)
    timers = racer.lifecycle.timers
    await until(lambda: timers.unconfirmed == 0, "the racer's timers to settle")
    assert await timer_ttl(owner, "long") == str(timer_seconds(600))
    assert await timer_ttl(owner, "untimed") is None
    assert timers.repairing == 0


async def test_a_refused_open_of_an_ended_session_changes_nothing(bus: SessionBus) -> None:
    await warmed(bus)
    await bus.open("ended", ttl=600)
    closed = await bus.session("ended").close("done")
    watcher = bus.lifecycle.watcher
    assert watcher is not None
    handled = watcher.handled
    with pytest.raises(SessionExists):
        await bus.open("ended", ttl=1)
    # Its timer runs out on the closed record: the expiry is a no-op.
    await until(lambda: watcher.handled > handled, "the stray timer to run out")
    info = await bus.session("ended").info()
    assert info.state is SessionState.CLOSED and info.close_reason == "done"
    assert info.closed_at == closed.closed_at


async def test_a_timer_deleted_by_another_bus_is_not_written_again(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    opener = await warmed(await bus_factory(nats_server.url))
    closer = await bus_factory(nats_server.url)
    timers = opener.lifecycle.timers
    timers.confirm_within = 30.0  # a repair would come long after the delete is seen
    async with writes_refused(opener, allow=1):
        await opener.open("closed-elsewhere", ttl=600)
    assert timers.unconfirmed == 1
    await closer.session("closed-elsewhere").close("done")  # deletes the timer key
    await until(lambda: timers.unconfirmed == 0, "the delete to be seen")
    assert timers.repaired == 0 and timers.withdrawn == 1
    assert await opener.sessions_kv.get(
        opener.names.session_timer_key("closed-elsewhere")) is None


async def test_repairs_run_a_bounded_number_at_once(bus: SessionBus) -> None:
    await warmed(bus)
    watcher = bus.lifecycle.watcher
    assert watcher is not None
    await watcher.stop()  # a stalled watcher: it confirms nothing
    timers = bus.lifecycle.timers
    sessions = [f"stalled-{i}" for i in range(3 * REPAIR_CONCURRENCY)]
    for sid in sessions:
        await timers.write_unacked(sid, 600)
    assert timers.unconfirmed == len(sessions)
    timers.confirm_within = 0.0
    timers._check()  # every one is due now
    assert timers.repaired == len(sessions)
    assert 0 < sum(not task.done() for task in timers._repairs) <= REPAIR_CONCURRENCY
    await until(lambda: timers.repairing == 0, "the repairs")
    stored = await bus.sessions_kv.get_many(
        [bus.names.session_timer_key(sid) for sid in sessions])
    assert len(stored) == len(sessions)


async def test_a_stored_envelope_is_sent_though_its_idle_timer_cannot_be_pushed_back(
    bus_factory: BusFactory, nats_server: NatsServer, caplog: pytest.LogCaptureFixture,
) -> None:
    bus = await bus_factory(nats_server.url)
    await bus.open("timer-refused", participant="a", participants=["a", "b"], ttl=600)
    # An operator seals the sessions bucket: records still read, nothing is written.
    info = await bus.js.stream_info(bus.sessions_kv.stream)
    info.config.sealed = True
    await bus.js.update_stream(info.config)
    # Another process has not pushed the timer back yet: its first send does.
    other = await bus_factory(nats_server.url)
    with caplog.at_level(logging.WARNING, logger="sessionbus"):
        sent = await other.session("timer-refused", participant="a").send("kept")
    assert "its idle timer was not pushed back" in caplog.text
    stored = [e.envelope_id async for e in other.session("timer-refused").history()]
    assert stored == [sent]
