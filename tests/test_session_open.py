"""Opening a session in one acknowledged write: the compare-and-set, the idle timer, the hint.

The idle timer is written without waiting for its own ack and confirmed by
the opening bus's expiry watcher; the open hint goes out only when the
record replaced an earlier one. These tests hold the guarantees that must
survive that: a taken id is refused, the session expires when idle (also
when its timer write was lost), and another process that saw the id end
notices it opened again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pausing import paused_until_logged
from sessionbus.bus import ClosedEvent, SessionBus
from sessionbus.bus._server import NatsServer
from sessionbus.bus._states import FORGOTTEN_SIZE
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus.errors import (
    BusClosedError,
    SessionExists,
    SessionNotFound,
    SessionTerminated,
)
from sessionbus.schemas import SessionMetadata, SessionState, decode
from waiting import stepped_until, until

from sessionbus.testing import BusFactory


async def heard_everything_before(publisher: SessionBus, listener: SessionBus) -> None:
    """Return once ``listener`` has handled every hint ``publisher`` sent before this call.

    A probe published after them reaches the listener's connection after
    them; once a subscription of the test's own on that connection has it,
    the earlier hints are queued to the listener's hint subscriptions, and
    once those queues are empty, each has been taken and counted.
    """
    probe = f"probe-{time.monotonic_ns()}"
    heard = await listener.nc.subscribe(listener.names.closed(probe))
    try:
        await server_holds_subscriptions(listener.nc, 5)
        wire = ClosedEvent(probe, SessionState.CLOSED, "probe", time.time()).to_wire()
        await publisher.nc.publish(publisher.names.closed(probe), wire)
        await heard.next_msg(timeout=10)
        hint_subs = listener.lifecycle.states._subs
        await until(lambda: all(sub.pending_msgs == 0 for sub in hint_subs), "the earlier hints")
    finally:
        await heard.unsubscribe()


async def opened_unacked(bus: SessionBus, session_id: str, *, ttl: float) -> None:
    """Open ``session_id`` on the path that does not wait for the timer's ack."""
    timers = bus.lifecycle.timers
    if not timers.can_skip_ack(watching=True):
        await bus.open(f"{session_id}-first", ttl=600)  # the first timer write is acked
    sent = timers.confirmed + timers.unconfirmed
    await bus.open(session_id, ttl=ttl)
    assert timers.confirmed + timers.unconfirmed == sent + 1


async def test_a_taken_id_is_refused_and_left_as_it_was(bus: SessionBus) -> None:
    await opened_unacked(bus, "taken", ttl=600)
    original = await bus.session("taken").info()
    with pytest.raises(SessionExists):
        await bus.open("taken", ttl=30, metadata={"second": True})
    await bus.session("taken").close("done")
    with pytest.raises(SessionExists):  # a closed record still holds the id
        await bus.open("taken", ttl=30)
    stored = await bus.session("taken").info()
    assert stored.created_at == original.created_at and stored.metadata == {}
    assert stored.state is SessionState.CLOSED


async def test_a_session_opened_without_the_timer_ack_expires_when_idle(
    bus: SessionBus,
) -> None:
    started = time.monotonic()
    await opened_unacked(bus, "quick", ttl=0.5)
    timers = bus.lifecycle.timers
    await until(lambda: timers.unconfirmed == 0, "the watcher to see the timer")
    assert timers.repaired == 0
    event = await asyncio.wait_for(bus.session("quick").wait_closed(), 10)
    assert event.state is SessionState.EXPIRED and event.reason == "idle"
    assert time.monotonic() - started >= 0.5


async def test_a_timer_write_that_was_lost_is_written_again(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    timers = bus.lifecycle.timers
    await bus.open("first", ttl=600)
    timers.confirm_within = 0.3

    async def lost(key: str, seconds: int) -> None:
        return None  # as if the server had dropped it (a leader change, say)

    monkeypatch.setattr(timers, "_publish", lost)
    await bus.open("unlucky", ttl=1)
    assert timers.unconfirmed + timers.repaired == 1  # the sweep may have run already
    timer_key = bus.names.session_timer_key("unlucky")
    assert await bus.sessions_kv.get(timer_key) is None
    await until(lambda: timers.repaired == 1 and timers.unconfirmed == 0, "the repair")
    event = await asyncio.wait_for(bus.session("unlucky").wait_closed(), 10)
    assert event.state is SessionState.EXPIRED and event.reason == "idle"


async def test_a_lost_timer_is_rewritten_once_a_later_one_is_seen(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    timers = bus.lifecycle.timers
    await bus.open("first", ttl=600)
    timers.confirm_within = 30.0  # not what repairs it here
    publish = timers._publish
    dropped: list[str] = []

    async def lose_the_first(key: str, seconds: int) -> None:
        if not dropped:
            dropped.append(key)
            return
        await publish(key, seconds)

    monkeypatch.setattr(timers, "_publish", lose_the_first)
    await bus.open("lost-timer", ttl=600)
    await bus.open("seen-timer", ttl=600)  # stored after it: seeing it shows the loss
    await until(lambda: timers.repaired == 1 and timers.unconfirmed == 0, "the repair",
                within=5)
    assert dropped == [bus.names.session_timer_key("lost-timer")]
    await until(lambda: timers.repairing == 0, "the repair write")
    assert await bus.sessions_kv.get(bus.names.session_timer_key("lost-timer")) is not None


async def test_a_first_use_of_an_id_sends_no_open_hint(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    await heard_everything_before(bus, other)
    before = other.lifecycle.states.hints
    await bus.open("brand-new", ttl=None)
    await opened_unacked(bus, "brand-new-too", ttl=600)
    await heard_everything_before(bus, other)
    assert other.lifecycle.states.hints == before + 1  # the probe alone


async def test_an_id_opened_again_is_noticed_by_a_bus_that_saw_it_end(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    await opened_unacked(bus, "again", ttl=600)
    await bus.session("again").close("first life")
    assert (await other.session("again").info()).state is SessionState.CLOSED
    with pytest.raises(SessionTerminated):  # known ended: refused without a read
        await other.session("again").send("too early")
    # The record goes (as the session store evicts it, or as it expires) and
    # the id is opened again over the marker it left.
    await bus.sessions_kv.delete(bus.names.session_key("again"))
    await heard_everything_before(bus, other)  # the close hint is not the open hint
    hints = other.lifecycle.states.hints
    await bus.open("again", ttl=600)
    await until(lambda: other.lifecycle.states.hints > hints, "the open hint")
    assert not other.session("again").is_terminal()
    await other.session("again").send("second life")


class HeldReads:
    """Counts the record reads of a bus; while ``hold`` is set, answers wait for it."""

    def __init__(self, sb: SessionBus, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent = self.served = 0
        self.hold: asyncio.Event | None = None
        get = sb.sessions_kv.get

        async def counted(key: str) -> Any:
            self.sent += 1
            hold = self.hold
            entry = await get(key)
            self.served += 1
            if hold is not None:
                await hold.wait()
            return entry

        monkeypatch.setattr(sb.sessions_kv, "get", counted)


def reader(sb: SessionBus, path: str) -> Callable[[str], Awaitable[object]]:
    """A record read through the owner of session state, or the lifecycle's own."""
    return sb.lifecycle.states.read if path == "owner" else sb.lifecycle.load


async def read_out(sb: SessionBus, path: str, reads: HeldReads,
                   session_id: str) -> asyncio.Future[object]:
    """Start a record read of ``session_id``; return once it is sent, before its answer."""
    sent = reads.sent
    reading = asyncio.ensure_future(reader(sb, path)(session_id))
    await stepped_until(lambda: reads.sent > sent, "the read's request")
    return reading


@pytest.mark.parametrize("path", ["owner", "load"])
async def test_a_read_started_before_an_open_hint_is_not_kept(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch, path: str,
) -> None:
    # A read in flight when the id's open hint arrives may carry the record
    # the hint replaced; kept, it would refuse sends to the new session.
    other = await bus_factory(nats_server.url)
    await bus.open("in-flight", ttl=600)
    await bus.session("in-flight").close("first life")
    states, reads = other.lifecycle.states, HeldReads(other, monkeypatch)
    reading = await read_out(other, path, reads, "in-flight")
    states.forget("in-flight")  # what the open hint does, while the read is out
    await reading
    assert states.get("in-flight") is None
    assert not other.session("in-flight").is_terminal()
    await reader(other, path)("in-flight")  # a read sent after it is kept
    assert reads.sent == 2 and states.get("in-flight") is not None


@pytest.mark.parametrize("path", ["owner", "load"])
async def test_a_read_out_across_a_reconnect_is_kept_as_stale(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch, path: str,
) -> None:
    # Hints missed while the connection was down may be newer than the read.
    other = await bus_factory(nats_server.url)
    await bus.open("across", ttl=600)
    states, reads = other.lifecycle.states, HeldReads(other, monkeypatch)
    reading = await read_out(other, path, reads, "across")
    states.stale()  # what a disconnect does, while the read is out
    await reading
    assert states.get("across") is not None and states.fresh("across") is None


async def test_who_waited_before_the_id_was_forgotten_hears_the_end_a_late_read_shows(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = await bus_factory(nats_server.url)
    await bus.open("waited", ttl=600)
    states, reads = other.lifecycle.states, HeldReads(other, monkeypatch)
    for sub in states._subs:
        await sub.unsubscribe()  # hints would read the record at times of their own
    waiting = asyncio.ensure_future(other.session("waited").wait_closed())
    await until(lambda: "waited" in states._waiters, "the waiter")
    await bus.session("waited").close("first life")
    reads.hold = asyncio.Event()
    sent = reads.sent
    confirming = asyncio.ensure_future(states.read("waited"))  # as a close hint makes it
    await stepped_until(lambda: reads.sent > sent, "the confirming read")
    states.forget("waited")  # the id opened again before the answer
    reads.hold.set()
    await confirming
    event = await asyncio.wait_for(waiting, 5)
    assert event.state is SessionState.CLOSED and event.reason == "first life"
    assert states.get("waited") is None


async def stored(sb: SessionBus, session_id: str) -> tuple[SessionMetadata, int]:
    """The session's record as stored, and its revision."""
    entry = await sb.sessions_kv.get(sb.names.session_key(session_id))
    assert entry is not None
    return decode(entry.value, SessionMetadata), entry.revision


async def ended(sb: SessionBus, session_id: str, reason: str) -> tuple[SessionMetadata, int]:
    """Open ``session_id`` and close it; its terminal record as stored, and its revision."""
    await sb.open(session_id, ttl=600)
    await sb.session(session_id).close(reason)
    return await stored(sb, session_id)


async def test_knowledge_is_replaced_only_by_newer_knowledge(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    states = other.lifecycle.states
    await bus.open("ordered", ttl=600)
    meta, revision = await stored(bus, "ordered")
    before_write = states.mark()  # a read that found nothing, sent before a write
    states.note(meta, revision)  # the write
    states.note_missing("ordered", read=before_write)
    assert states.get("ordered") is not None and states.get("ordered").revision == revision
    found = states.mark()  # a read that found the record, sent before one that found none
    states.note_missing("ordered", read=states.mark())
    states.note(meta, revision, read=found)
    assert states.get("ordered") is not None and states.get("ordered").meta is None


async def test_a_late_end_is_told_once_to_the_feeds_and_never_to_close_listeners(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    states = other.lifecycle.states
    hints = states.hints
    meta, revision = await ended(bus, "told-once", "first life")
    # The close's own hint first, while nothing here depends on the session
    # (a feed open then would have the record read and hear the close from it).
    await until(lambda: states.hints > hints, "the close hint")
    heard: list[ClosedEvent] = []
    states.on_closed(heard.append)
    async with states.closed_feed() as feed:
        first, second = states.mark(), states.mark()  # two reads out, on two paths
        states.forget("told-once")
        states.note(meta, revision, read=first)
        states.note(meta, revision, read=second)
        event = await asyncio.wait_for(anext(feed), 5)
        assert event.reason == "first life"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(feed), 0.2)  # not a second time
    assert heard == [] and states.get("told-once") is None


async def test_a_read_out_across_two_forgets_tells_only_who_waited_before_the_first(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    other = await bus_factory(nats_server.url)
    states = other.lifecycle.states
    meta, revision = await ended(bus, "two-lives", "first life")
    first_life = asyncio.ensure_future(states.wait_closed("two-lives"))
    await stepped_until(lambda: "two-lives" in states._waiters, "the first waiter")
    read = states.mark()
    states.forget("two-lives")
    second_life = asyncio.ensure_future(states.wait_closed("two-lives"))
    await stepped_until(lambda: len(states._waiters["two-lives"]) == 2, "the second waiter")
    states.forget("two-lives")
    states.note(meta, revision, read=read)
    assert (await asyncio.wait_for(first_life, 5)).reason == "first life"
    await asyncio.sleep(0)
    assert not second_life.done()
    second_life.cancel()


async def test_a_read_older_than_what_is_remembered_is_read_again(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer
) -> None:
    # Past FORGOTTEN_SIZE ids forgotten while a read was out, whether its
    # own id was is unknown: it is not kept, and the record is read again.
    other = await bus_factory(nats_server.url)
    states = other.lifecycle.states
    meta, revision = await ended(bus, "long-out", "done")
    waiting = asyncio.ensure_future(states.wait_closed("long-out"))
    await stepped_until(lambda: "long-out" in states._waiters, "the waiter")
    read = states.mark()
    for i in range(FORGOTTEN_SIZE + 1):
        states.forget(f"other-{i}")
    states.note(meta, revision, read=read)
    assert states.get("long-out") is None
    assert (await asyncio.wait_for(waiting, 5)).reason == "done"  # from the read again
    assert states.get("long-out") is not None


async def test_a_stop_answers_reads_that_were_forgotten(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer,
) -> None:
    other = await bus_factory(nats_server.url)
    states = other.lifecycle.states
    reading = asyncio.ensure_future(states.read("never-answered"))
    await asyncio.sleep(0)  # queued, not sent
    states.forget("never-answered")
    await states.stop()
    with pytest.raises(BusClosedError):
        await asyncio.wait_for(reading, 5)


async def test_an_envelope_is_admitted_by_a_read_sent_after_it_was_stored(
    bus: SessionBus, bus_factory: BusFactory, nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker asked to admit an envelope of a reopened id whose open hint
    # has not arrived yet, while an older read of the id is out, must not
    # settle the envelope on what that read shows.
    other = await bus_factory(nats_server.url)
    await bus.open("readmit", ttl=600)
    await bus.session("readmit").close("first life")
    states, reads = other.lifecycle.states, HeldReads(other, monkeypatch)
    for sub in states._subs:
        await sub.unsubscribe()  # the open hint is late
    reads.hold = asyncio.Event()
    first = asyncio.ensure_future(states.read("readmit"))
    await until(lambda: reads.served == 1, "the first read's answer")  # held from its reader
    await bus.sessions_kv.delete(bus.names.session_key("readmit"))
    await bus.open("readmit", ttl=600)
    stored_at = time.time()
    admitted = asyncio.ensure_future(states.admit("readmit", lambda: stored_at))
    await asyncio.sleep(0)
    hold, reads.hold = reads.hold, None  # the first read is answered; later ones are not held
    hold.set()
    assert (await first).meta is not None and not (await first).active
    known = await asyncio.wait_for(admitted, 5)
    assert known.active and reads.sent == 2


async def test_an_end_older_than_the_record_lifetime_is_read_again(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    # The terminal record lives envelope_max_age; after that (and its marker)
    # the id can be created with no hint, so the end is not trusted longer.
    sb = await bus_factory(nats_server.url, envelope_max_age=1.0, duplicate_window=1.0)
    await sb.open("short-lived", ttl=None)
    closed = await sb.session("short-lived").close("done")
    assert closed.closed_at is not None
    assert sb.session("short-lived").is_terminal()
    assert sb.lifecycle.states.fresh("short-lived") is not None
    await until(lambda: not sb.session("short-lived").is_terminal(), "the end to age out",
                within=5)
    assert time.time() - closed.closed_at >= 1.0
    assert sb.lifecycle.states.fresh("short-lived") is None
    try:  # read again: the record decides
        info = await sb.session("short-lived").info()
    except SessionNotFound:
        return  # expired already, as it may at one second
    assert info.state is SessionState.CLOSED


async def test_every_bus_keeps_terminal_records_as_long_as_the_stream_keeps_envelopes(
    nats_server: NatsServer, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    # How long an end is trusted rests on every bus writing terminal records
    # with the same TTL: a bus asking for less than the stream keeps adopts
    # the stream's retention (and says so), like its partition count.
    first = await bus_factory(nats_server.url, envelope_max_age=3600.0)
    with caplog.at_level(logging.WARNING, logger="sessionbus.bus.core"):
        short = await bus_factory(nats_server.url, envelope_max_age=5.0)
    assert (first.envelope_max_age, short.envelope_max_age) == (3600.0, 3600.0)
    assert any("not the 5 s asked for" in r.getMessage() for r in caplog.records)
    await short.open("kept", ttl=None)
    await short.session("kept").close("done")
    msg = await short.js.get_last_msg(short.sessions_kv.stream,
                                      f"$KV.{short.sessions_kv.name}.{short.names.session_key('kept')}")
    assert msg.headers is not None and msg.headers.get("Nats-TTL") in ("3600", "3600s")



async def test_an_open_whose_write_goes_unanswered_is_sent_again_and_knows_its_own_record(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    await opened_unacked(bus, "before", ttl=600)  # the expiry watcher runs
    async with paused_until_logged(nats_server, "got no answer; writing it again") as resume:
        session = await bus.open("unanswered", participants=["a"], ttl=600, participant="a")
    assert resume.resumed  # the first write was stored after its wait ended
    stored = await bus.session("unanswered").info()
    assert stored == session.metadata and stored.state is SessionState.ACTIVE
    await session.send("hello")  # the handle works
    with pytest.raises(SessionExists):  # and the id is still taken for anyone else
        await bus.open("unanswered", ttl=600)
