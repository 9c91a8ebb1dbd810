"""Completion records: a turn that completed is not run again when its ack is lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from nats.js.api import DiscardPolicy
from sessionbus.bus._server import NatsServer
from sessionbus.bus.core import SessionBus
from sessionbus.bus.session import Session
from sessionbus.workers import Turn, Worker, WorkerConfig
from sessionbus.workers import _completions as _completions_module
from sessionbus.workers._completions import Completions
from test_worker import settled
from waiting import sigstop
from worker_proc import FAST

from sessionbus.testing import BusFactory, ServerFactory


async def send_all(sb: SessionBus, session: Session, contents: list[str]) -> list[int]:
    """Send each content; return the stream sequence each was stored at."""
    subject = sb.names.stored(session.session_id, sb.partitions)
    seqs = []
    for content in contents:
        await session.send(content)
        msg = await sb.js.get_last_msg(sb.names.envelope_stream, subject)
        seqs.append(int(msg.seq or 0))
    return seqs


async def handle_until(sb: SessionBus, count: int, config: WorkerConfig = FAST
                       ) -> list[tuple[str, str]]:
    """Run a worker of group ``g`` until it handled ``count`` envelopes and all are settled.

    Returns (session id, content) of each handled envelope, in handling order.
    """
    handled: list[tuple[str, str]] = []
    enough = asyncio.Event()

    async def handle(turn: Turn) -> None:
        handled.append((turn.session_id, turn.envelope.content))
        if len(handled) == count:
            enough.set()

    await run_until(sb, Worker(sb, group="g", handler=handle, config=config), enough)
    return handled


async def run_until(sb: SessionBus, worker: Worker, done: asyncio.Event) -> None:
    """Run ``worker`` until ``done`` is set and everything it pulled is settled."""
    await worker.start()
    try:
        await asyncio.wait_for(done.wait(), 15)
        await settled(sb)
    finally:
        await worker.stop()


async def record_of(sb: SessionBus, group: str, sid: str) -> int | None:
    entry = await sb.workers_kv.get(sb.names.completion_key(group, sid))
    return None if entry is None else int(entry.value)


async def test_a_turn_starts_only_once_its_predecessor_is_recorded(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url, prefix="cr", partitions=2)
    session = await sb.open("chain", participants=["client", "g"], participant="client")
    seen: list[tuple[int, int | None]] = []
    done = asyncio.Event()

    async def handle(turn: Turn) -> None:
        # What a successor would read, were this worker to die now.
        seen.append((turn.sequence, await record_of(sb, "g", turn.session_id)))
        if len(seen) == 3:
            done.set()

    seqs = await send_all(sb, session, ["a", "b", "c"])
    await run_until(sb, Worker(sb, group="g", handler=handle, config=FAST,
                               only_addressed=False), done)
    assert seen == [(seqs[0], None), (seqs[1], seqs[0]), (seqs[2], seqs[1])]
    assert await record_of(sb, "g", "chain") == seqs[2]


@pytest.mark.parametrize("domain", [None, "hub"])
async def test_envelopes_a_record_covers_are_acked_without_a_turn(
    nats_server_factory: ServerFactory, bus_factory: BusFactory, domain: str | None
) -> None:
    # A previous owner completed "a" and "b" and recorded it; its acks were
    # lost (a server crash, a paused worker): the next owner must not run
    # them again, after or before "c". Through a JetStream domain (a leaf
    # node's workers) records are written and read all the same.
    server = nats_server_factory(name="cs", domain=domain)
    sb = await bus_factory(server.url, prefix="cs", partitions=2, domain=domain)
    done_elsewhere = await sb.open("done", participants=["client", "g"], participant="client")
    fresh = await sb.open("fresh", participants=["client", "g"], participant="client")
    seqs = await send_all(sb, done_elsewhere, ["a", "b", "c"])
    await send_all(sb, fresh, ["x", "y"])
    await sb.workers_kv.put(sb.names.completion_key("g", "done"), str(seqs[1]).encode())
    # Another group's record says nothing about this group.
    await sb.workers_kv.put(sb.names.completion_key("other", "fresh"), b"999999")
    handled = await handle_until(sb, 3)
    assert [c for s, c in handled if s == "done"] == ["c"]
    assert [c for s, c in handled if s == "fresh"] == ["x", "y"]


async def test_a_malformed_record_is_ignored_not_trusted(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url, prefix="cm", partitions=2)
    session = await sb.open("m", participants=["client", "g"], participant="client")
    await send_all(sb, session, ["a", "b"])
    await sb.workers_kv.put(sb.names.completion_key("g", "m"), b"not a sequence")
    assert await handle_until(sb, 2) == [("m", "a"), ("m", "b")]


async def test_records_can_be_switched_off(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url, prefix="co", partitions=2)
    session = await sb.open("off", participants=["client", "g"], participant="client")
    await send_all(sb, session, ["a", "b"])
    handled = await handle_until(sb, 2, FAST.replace(completion_records=False))
    assert handled == [("off", "a"), ("off", "b")]
    assert await record_of(sb, "g", "off") is None


async def _completions(sb: SessionBus, group: str = "g") -> Completions:
    records = Completions(nc=sb.nc, bucket=sb.workers_kv, names=sb.names, group=group,
                          api_prefix=sb.api_prefix, ttl=60)
    await records.start()
    return records


async def test_a_record_is_confirmed_by_the_servers_ack(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url, prefix="cw", partitions=2)
    records = await _completions(sb)
    try:
        for seq in (3, 7):  # the second write of a session replaces the first
            await records.record("s", seq, partition=0)
        assert records.unconfirmed == 1
        await asyncio.wait_for(records.confirm("s"), 5)
        assert records.unconfirmed == 0
        assert await record_of(sb, "g", "s") == 7
        assert await records.lookup(["s", "never"]) == {"s": 7}
    finally:
        await records.stop()


async def test_a_record_whose_flush_fails_is_not_written_and_nothing_raises(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    # With nats-py's flusher gone, a publish writes inline; the socket is
    # dead, so that write fails. The record stays to be written again.
    sb = await bus_factory(nats_server.url, prefix="cf", partitions=2)
    records = await _completions(sb)
    nc = sb.nc
    try:
        await nc.flush()
        assert nc._flush_queue.empty()  # the flusher took the flush's kick
        nc._flusher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await nc._flusher_task
        nc._transport._io_writer.transport.abort()
        await records.record("s", 5, partition=0)  # raised ConnectionResetError before
        assert records.unconfirmed == 1
        assert not records._writes  # settled as not written, not left to the sweep
        write = records._unconfirmed["s"]
        assert write.settled and isinstance(write.error, _completions_module.RecordNotStored)
    finally:
        # Its unsubscribe writes inline on the dead socket too.
        with contextlib.suppress(ConnectionResetError):
            await records.stop()


async def _fill_the_workers_stream(sb: SessionBus) -> None:
    """Make the workers bucket's stream refuse every write: its message limit is reached."""
    info = await sb.js.stream_info(sb.workers_kv.stream)
    await sb.js.update_stream(replace(info.config, max_msgs=max(1, info.state.messages),
                                      discard=DiscardPolicy.NEW))
    if info.state.messages == 0:
        await sb.workers_kv.put("filler", b"x")


async def _delete_the_workers_stream(sb: SessionBus) -> None:
    """Leave no stream to answer: the server replies with a 503 status."""
    await sb.js.delete_stream(sb.workers_kv.stream)


@pytest.mark.parametrize(("spoil", "reported"), [
    (_fill_the_workers_stream, "refused: b'{"),
    (_delete_the_workers_stream, "(status 503"),
], ids=["refused", "no-stream"])
async def test_a_record_the_server_does_not_store_is_written_again_then_given_up(
    nats_server: NatsServer, bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, spoil: Callable[[SessionBus], Awaitable[None]],
    reported: str,
) -> None:
    monkeypatch.setattr(_completions_module, "_CONFIRM_WAIT", 0.05)
    sb = await bus_factory(nats_server.url, prefix="cx", partitions=2)
    records = await _completions(sb)
    await spoil(sb)
    try:
        await records.record("s", 5, partition=0)
        await asyncio.wait_for(records.confirm("s"), 10)
        assert records.unconfirmed == 0
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("not stored after 5 attempts" in e and reported in e for e in errors), errors
    finally:
        await records.stop()


async def test_an_unanswered_record_is_waited_for_then_written_again(
    nats_server: NatsServer, bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_completions_module, "_CONFIRM_WAIT", 0.3)
    monkeypatch.setattr(_completions_module, "_SWEEP_EVERY", 0.05)
    sb = await bus_factory(nats_server.url, prefix="cu", partitions=2)
    records = await _completions(sb)
    assert nats_server.pid is not None
    loop = asyncio.get_running_loop()
    await sigstop(nats_server.pid)  # writes go out; no reply comes back
    try:
        await records.record("s", 5, partition=0)
        # A turn cancelled while it waits (a fence) leaves the write to the next one.
        cancelled = asyncio.create_task(records.confirm("s"))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        began = loop.time()
        waiting = asyncio.create_task(records.confirm("s"))

        def rewritten() -> bool:
            return any("writing it again" in r.getMessage() for r in caplog.records)

        while not rewritten():
            assert not waiting.done()
            assert loop.time() - began < 5, "the wait never gave up"
            await asyncio.sleep(0.02)
        assert loop.time() - began >= 0.3  # not before the confirmation wait is over
        assert not waiting.done()
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    try:
        await asyncio.wait_for(waiting, 10)  # the rewrite's reply confirms it
        assert records.unconfirmed == 0
        assert await record_of(sb, "g", "s") == 5
    finally:
        await records.stop()
