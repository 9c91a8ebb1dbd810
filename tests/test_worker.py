"""One worker against a real server: order, concurrency, acks, retries, dead letters, control."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.aio.msg import Msg
from sessionbus.bus import SessionBus
from sessionbus.bus._history import read_history
from sessionbus.bus._jsapi import consumer_info
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import ConfigError, WorkerError
from sessionbus.schemas import Envelope, decode
from sessionbus.workers import (
    DEAD_ATTEMPTS_HEADER,
    DEAD_GROUP_HEADER,
    DEAD_REASON_HEADER,
    DeadLetter,
    Drop,
    Retry,
    Turn,
    Worker,
    WorkerConfig,
    WorkerState,
)
from waiting import until
from worker_proc import FAST, ensure_sessions, envelope, poll, publish, publish_many

from sessionbus.testing import BusFactory

WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def sb(nats_server: NatsServer, bus_factory: BusFactory) -> SessionBus:
    return await bus_factory(nats_server.url, partitions=8)


@pytest.fixture
async def start_worker(sb: SessionBus) -> AsyncIterator[WorkerFactory]:
    workers: list[Worker] = []

    async def make(handler: Any, **kwargs: Any) -> Worker:
        kwargs.setdefault("config", FAST)
        worker = Worker(sb, group=kwargs.pop("group", "g"), handler=handler, **kwargs)
        await worker.start()
        workers.append(worker)
        await wait_for(lambda: len(worker.partitions) == sb.partitions, "partitions pulled")
        return worker

    yield make
    for worker in workers:
        await worker.stop()


#: Poll a condition until true, failing after ``within`` (15) seconds.
wait_for = functools.partial(until, within=15.0, every=0.01)


async def unsettled(sb: SessionBus, group: str = "g") -> tuple[int, int]:
    """(pending, ack pending) summed over the group's consumers."""
    pending = ack_pending = 0
    for p in range(sb.partitions):
        info = await consumer_info(sb.nc, stream=sb.names.envelope_stream,
                                   consumer=sb.names.worker_consumer(group, p))
        pending += info["num_pending"]
        ack_pending += info["num_ack_pending"]
    return pending, ack_pending


async def settled(sb: SessionBus, group: str = "g", within: float = 10.0) -> tuple[int, int]:
    """Poll :func:`unsettled` until nothing is pending (acks are asynchronous)."""
    return await poll(lambda: unsettled(sb, group), lambda c: c == (0, 0), within=within)


async def dead_letter_of(sb: SessionBus, group: str, sid: str) -> Any:
    return await sb.js.get_last_msg(sb.names.dead_letter_stream,
                                    sb.names.dead_letter(group, sid))


async def test_sessions_run_in_order_one_turn_at_a_time_and_concurrently(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    spans: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    active = peak = 0

    async def handle(turn: Turn) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        start = time.monotonic()
        await asyncio.sleep(0.005)
        active -= 1
        spans[turn.session_id].append((turn.envelope.event_data["idx"], start, time.monotonic()))

    await start_worker(handle, max_concurrency=4)
    await publish_many(sb, [envelope(f"s{s}", i) for i in range(5) for s in range(20)])
    await wait_for(lambda: sum(map(len, spans.values())) == 100, "100 turns")
    for sid, turns in spans.items():
        assert [t[0] for t in turns] == list(range(5)), sid
        for a, b in itertools.pairwise(turns):
            assert a[2] <= b[1], f"{sid}: turns overlap"
    assert 2 <= peak <= 4
    assert await settled(sb) == (0, 0)


async def test_failure_is_retried_with_backoff_and_later_envelopes_wait(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[tuple[int, int, float]] = []

    async def handle(turn: Turn) -> None:
        idx = turn.envelope.event_data["idx"]
        seen.append((idx, turn.attempt, time.monotonic()))
        if idx == 1 and turn.attempt < 3:
            raise ValueError("flaky")

    await start_worker(handle)
    await publish_many(sb, [envelope("a", i) for i in range(3)])
    await wait_for(lambda: len(seen) == 5, "5 runs")
    assert [(i, a) for i, a, _ in seen] == [(0, 1), (1, 1), (1, 2), (1, 3), (2, 1)]
    # Backoff doubles from retry_backoff (0.05 s): 0.05 then 0.1 s at least.
    assert seen[2][2] - seen[1][2] >= 0.045
    assert seen[3][2] - seen[2][2] >= 0.095
    assert await settled(sb) == (0, 0)


async def test_exhausted_attempts_go_to_the_dead_letter_subject(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[tuple[int, int]] = []

    async def handle(turn: Turn) -> None:
        idx = turn.envelope.event_data["idx"]
        seen.append((idx, turn.attempt))
        if idx == 1:
            raise ValueError("always broken")

    await start_worker(handle, max_attempts=3)
    first = envelope("a", 0)
    bad = envelope("a", 1)
    await publish_many(sb, [first, bad, envelope("a", 2)])
    await wait_for(lambda: len(seen) == 5, "5 runs")
    assert seen == [(0, 1), (1, 1), (1, 2), (1, 3), (2, 1)]
    dead = await dead_letter_of(sb, "g", "a")
    assert decode(dead.data, Envelope).envelope_id == bad.envelope_id
    assert dead.headers[DEAD_GROUP_HEADER] == "g"
    assert dead.headers[DEAD_ATTEMPTS_HEADER] == "3"
    assert "always broken" in dead.headers[DEAD_REASON_HEADER]
    assert await settled(sb) == (0, 0)


async def test_malformed_envelope_is_dead_lettered_at_once(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[int] = []

    async def handle(turn: Turn) -> None:
        seen.append(turn.envelope.event_data["idx"])

    await start_worker(handle)
    await publish(sb, envelope("m", 0))
    await sb.js.publish(sb.names.inbound("m"), b"\xc1 not msgpack")
    await publish(sb, envelope("m", 1))
    await wait_for(lambda: seen == [0, 1], "both valid envelopes")
    dead = await dead_letter_of(sb, "g", "m")
    assert dead.data == b"\xc1 not msgpack"
    assert dead.headers[DEAD_REASON_HEADER].startswith("malformed envelope")
    assert dead.headers[DEAD_ATTEMPTS_HEADER] == "1"
    assert await settled(sb) == (0, 0)


async def _raw_hpub(url: str, subject: str, header_block: bytes, body: bytes = b"") -> None:
    """Publish ``header_block`` as written, status line and all (nats-py writes its own line)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        size = len(header_block) + len(body)
        writer.write(b'CONNECT {"verbose":false,"headers":true}\r\n'
                     + b"HPUB %s %d %d\r\n" % (subject.encode(), len(header_block), size)
                     + header_block + body + b"\r\nPING\r\n")
        await writer.drain()
        assert await reader.readline() == b"PONG\r\n"
    finally:
        writer.close()


async def test_envelopes_stored_with_a_status_line_are_dead_lettered_not_taken_for_one(
    sb: SessionBus, start_worker: WorkerFactory, nats_server: NatsServer,
) -> None:
    """A raw publish may send a header block that reads like a server status.

    nats-server stores it without the status line; what reaches workers and
    readers is an empty, undecodable envelope, parked like any other.
    """
    seen: list[int] = []

    async def handle(turn: Turn) -> None:
        seen.append(turn.envelope.event_data["idx"])

    await start_worker(handle)
    await publish(sb, envelope("st", 0))
    forged = [b"NATS/1.0 404 No Messages\r\n\r\n",
              b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n",
              b"NATS/1.0 423 Nats-Pin-Id mismatch\r\n\r\n",
              b"NATS/1.0 100 Idle Heartbeat\r\nNats-Consumer-Stalled: _INBOX.x\r\n\r\n"]
    for block in forged:
        await _raw_hpub(nats_server.url, sb.names.inbound("st"), block)
    await publish(sb, envelope("st", 1))
    await wait_for(lambda: seen == [0, 1], "both valid envelopes")
    dead_subject = sb.names.dead_letter("g", "st")

    async def parked() -> int:
        info = await sb.js.stream_info(sb.names.dead_letter_stream, subjects_filter=dead_subject)
        return (info.state.subjects or {}).get(dead_subject, 0)

    assert await poll(parked, lambda n: n == len(forged), within=10.0) == len(forged)
    assert await settled(sb) == (0, 0)
    history = await read_history(sb, "st")
    assert [e.event_data["idx"] for _, e in history] == [0, 1]


async def test_handler_control_flow_retry_drop_dead_letter(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[tuple[str, int, float]] = []

    async def handle(turn: Turn) -> None:
        kind = turn.envelope.event_data["kind"]
        seen.append((kind, turn.attempt, time.monotonic()))
        if kind == "retry" and turn.attempt == 1:
            raise Retry(delay=0.3)
        if kind == "drop":
            raise Drop("not for us")
        if kind == "dead":
            raise DeadLetter("cannot parse the question")

    await start_worker(handle, max_attempts=2)
    envs = [Envelope(session_id="c", event_data={"kind": k})
            for k in ("retry", "drop", "dead", "ok")]
    await publish_many(sb, envs)
    await wait_for(lambda: len(seen) == 5, "5 runs")
    assert [(k, a) for k, a, _ in seen] == [
        ("retry", 1), ("retry", 2), ("drop", 1), ("dead", 1), ("ok", 1)]
    assert seen[1][2] - seen[0][2] >= 0.29
    dead = await dead_letter_of(sb, "g", "c")
    assert dead.headers[DEAD_REASON_HEADER] == "cannot parse the question"
    assert await settled(sb) == (0, 0)
    with pytest.raises(ConfigError):
        Retry(delay=-1)


async def test_expired_envelope_is_acked_and_skipped(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[int] = []

    async def handle(turn: Turn) -> None:
        seen.append(turn.envelope.event_data["idx"])

    await start_worker(handle)
    await publish(sb, envelope("t", 0, ttl_seconds=1.0, created_at=time.time() - 5))
    await publish(sb, envelope("t", 1, ttl_seconds=60.0))
    await wait_for(lambda: seen == [1], "the live envelope")
    assert await settled(sb) == (0, 0)


async def test_handler_replying_to_every_turn_does_not_see_its_own_replies(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    turns: list[str] = []

    async def handle(turn: Turn) -> None:
        turns.append(turn.envelope.sender_id)
        await turn.reply(f"re: {turn.envelope.content}")  # to everyone, the group included

    worker = await start_worker(handle)
    session = await sb.open("loop", participant="client", participants=["g"])
    for text in ("a", "b", "c"):
        await session.send(text)

    async def history() -> list[Envelope]:
        return [e async for e in session.history()]

    await poll(history, lambda h: len(h) >= 6)
    assert await settled(sb) == (0, 0)  # the replies came back to the group and were acked
    assert turns == ["client"] * 3
    assert worker.skipped == 3
    found = await history()
    assert len(found) == 6
    assert sorted(e.content for e in found) == ["a", "b", "c", "re: a", "re: b", "re: c"]


async def test_envelope_for_another_agent_is_skipped_in_order(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[int] = []

    async def handle(turn: Turn) -> None:
        seen.append(turn.envelope.event_data["idx"])

    worker = await start_worker(handle)
    await publish(sb, envelope("t", 0, audience=["other"]))
    await publish(sb, envelope("t", 1, audience=["other", "g"]))
    await publish(sb, envelope("t", 2, audience=["other"]))
    await publish(sb, envelope("t", 3))
    await wait_for(lambda: seen == [1, 3], "the addressed envelopes")
    assert await settled(sb) == (0, 0)
    assert worker.skipped == 2
    assert seen == [1, 3]


async def test_only_addressed_off_hands_over_every_envelope(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[int] = []

    async def handle(turn: Turn) -> None:
        seen.append(turn.envelope.event_data["idx"])

    worker = await start_worker(handle, only_addressed=False)
    await publish(sb, envelope("t", 0, audience=["other"]))
    await publish(sb, Envelope(session_id="t", sender_id="g", event_data={"idx": 1}))
    await publish(sb, envelope("t", 2))
    await wait_for(lambda: seen == [0, 1, 2], "every envelope")
    assert await settled(sb) == (0, 0)
    assert worker.skipped == 0


async def test_priority_picks_the_next_session_at_the_concurrency_bound(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    gate = asyncio.Event()
    order: list[str] = []

    async def handle(turn: Turn) -> None:
        if turn.session_id == "blocker":
            await gate.wait()
        order.append(turn.session_id)

    worker = await start_worker(handle, max_concurrency=1)
    await publish(sb, envelope("blocker", 0))
    await wait_for(lambda: worker.scheduler.running == 1, "the blocker running")
    envs = [envelope(f"low{i}", 0) for i in range(3)]
    envs += [envelope(f"high{i}", 0, priority=5) for i in range(3)]
    envs.insert(2, envelope("mid", 0, priority=2))
    await publish_many(sb, envs)
    # Held, and each session's completion record read: all of them can start.
    await wait_for(lambda: worker.scheduler.held == 8 and worker.scheduler.awaiting_records == 0,
                   "all envelopes held and ready")
    gate.set()
    await wait_for(lambda: len(order) == 8, "all turns")
    # Same priority: arrival order, which across partitions is not publish order.
    assert order[0] == "blocker"
    assert sorted(order[1:4]) == ["high0", "high1", "high2"]
    assert order[4] == "mid"
    assert sorted(order[5:]) == ["low0", "low1", "low2"]


async def test_held_envelopes_get_in_progress_by_age_not_at_once(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    # ack_wait 6 s: an in_progress is due a third of it (2 s) after the pull
    # request that brought a held envelope (sweeps every 0.75 s), well before
    # the server would redeliver.
    config = WorkerConfig(lease_ttl=2, ack_wait=6.0, poll_interval=0.2, priority_timeout=8.0)
    loop = asyncio.get_running_loop()
    in_progress: list[float] = []
    first = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        if msg.data == b"+WPI":
            in_progress.append(loop.time())
            first.set()

    watcher = await sb.nc.subscribe(f"$JS.ACK.{sb.names.envelope_stream}.>", cb=on_ack)
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[tuple[int, int]] = []

    async def handle(turn: Turn) -> None:
        handled.append((turn.envelope.event_data["idx"], turn.attempt))
        if turn.envelope.event_data["idx"] == 0:
            started.set()
            await release.wait()

    try:
        await start_worker(handle, config=config)
        await publish(sb, envelope("held", 0))
        await asyncio.wait_for(started.wait(), 10)
        sent = loop.time()
        await publish_many(sb, [envelope("held", i) for i in range(1, 4)])
        await asyncio.wait_for(first.wait(), 10)
        # The session's pulls were requested at most poll_interval (plus the
        # first turn's start) before the three were sent: none is due before
        # about 1.8 s. Counted from loop time 0 instead, all were due at the
        # first sweep (0.75 s at the latest). Due, they get one before ack_wait.
        assert 1.2 <= in_progress[0] - sent < 6.0, in_progress[0] - sent
        release.set()
        await wait_for(lambda: len(handled) == 4, "4 turns")
        assert handled == [(0, 1), (1, 1), (2, 1), (3, 1)]
    finally:
        await watcher.unsubscribe()


async def test_interrupt_cancels_only_the_running_turn(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    started = asyncio.Event()
    outcome: dict[int, str] = {}
    flags: list[bool] = []

    async def handle(turn: Turn) -> None:
        idx = turn.envelope.event_data["idx"]
        if idx == 0:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                flags.append(turn.interrupted.is_set())
                outcome[idx] = "cancelled"
                raise
        outcome[idx] = "done"

    await start_worker(handle)
    session = await sb.open("int", participant="client")
    for i in range(3):
        await session.send("x", event_data={"idx": i})
    await asyncio.wait_for(started.wait(), 10)
    await session.interrupt("stop")
    await wait_for(lambda: len(outcome) == 3, "all three envelopes")
    assert outcome == {0: "cancelled", 1: "done", 2: "done"}
    assert flags == [True]
    assert await settled(sb) == (0, 0)


async def test_close_cancels_the_running_turn_and_discards_queued_envelopes(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()
    seen: list[tuple[str, int]] = []

    async def handle(turn: Turn) -> None:
        seen.append((turn.session_id, turn.envelope.event_data["idx"]))
        if turn.session_id == "closing":
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    worker = await start_worker(handle)
    session = await sb.open("closing", participant="client")
    for i in range(4):
        await session.send("x", event_data={"idx": i})
    await asyncio.wait_for(started.wait(), 10)
    await wait_for(lambda: worker.scheduler.held == 4, "the queued envelopes held")
    await session.close("done")
    await asyncio.wait_for(cancelled.wait(), 10)
    await wait_for(lambda: worker.scheduler.held == 0, "queue discarded")
    other = await sb.open("other", participant="client")
    await other.send("y", event_data={"idx": 0})
    await wait_for(lambda: ("other", 0) in seen, "another session still served")
    assert [s for s in seen if s[0] == "closing"] == [("closing", 0)]
    assert await settled(sb) == (0, 0)


async def test_reply_stream_and_history(sb: SessionBus, start_worker: WorkerFactory) -> None:
    histories: list[list[str]] = []

    async def handle(turn: Turn) -> None:
        if turn.envelope.sender_id == "echo":
            return
        histories.append([e.content for e in await turn.history()])
        await turn.stream("to")
        await turn.stream(b"ken")
        await turn.reply(f"echo: {turn.envelope.content}")

    chunks: list[bytes] = []
    got_chunks = asyncio.Event()

    async def on_chunk(msg: Any) -> None:
        chunks.append(msg.data)
        if len(chunks) == 2:
            got_chunks.set()

    await sb.nc.subscribe(sb.names.output("chat", "echo"), cb=on_chunk)
    await sb.nc.flush()
    await start_worker(handle, group="echo")
    session = await sb.open("chat", participant="client", participants=["echo"])
    question = await session.send("ping")
    await asyncio.wait_for(got_chunks.wait(), 10)
    assert chunks == [b"to", b"ken"]

    async def replies() -> list[Envelope]:
        return [e async for e in session.history() if e.sender_id == "echo"]

    found = await poll(replies, bool)
    assert len(found) == 1
    reply = found[0]
    assert (reply.content, reply.causation_id, reply.depth) == ("echo: ping", question, 1)
    assert histories == [["ping"]]


async def test_redelivered_finished_envelope_is_acked_and_skipped(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    seen: list[int] = []

    async def handle(turn: Turn) -> None:
        seen.append(turn.sequence)

    worker = await start_worker(handle)
    await publish(sb, envelope("d", 0))
    await wait_for(lambda: len(seen) == 1, "one turn")
    # Replay the same stream message into the scheduler, as a redelivery would.
    sub = await sb.js.pull_subscribe(sb.names.history_filter("d"), durable=None,
                                     stream=sb.names.envelope_stream)
    [msg] = await sub.fetch(1, timeout=5)
    await worker.scheduler.offer(sb.names.partition_of("d", sb.partitions), [msg])
    await publish(sb, envelope("d", 1))
    await wait_for(lambda: len(seen) == 2, "the next envelope")
    assert seen[1] > seen[0] and len(set(seen)) == 2
    assert worker.scheduler.held == 0


async def test_per_session_state_stays_bounded_with_many_sessions(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    config = FAST.replace(max_held=500, dedupe_size=1000)
    done = 0

    async def handle(turn: Turn) -> None:
        nonlocal done
        done += 1

    total = 20_000
    # Workers run only sessions that exist: create the records first, apart
    # from the worker's load.
    await ensure_sessions(sb, [f"many-{i}" for i in range(total)])
    worker = await start_worker(handle, config=config, max_concurrency=32)
    peak_sessions = peak_dedupe = 0

    async def watch() -> None:
        nonlocal peak_sessions, peak_dedupe
        while True:
            peak_sessions = max(peak_sessions, worker.scheduler.session_count)
            peak_dedupe = max(peak_dedupe, worker.scheduler.dedupe_size)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    for start in range(0, total, 5000):
        await publish_many(sb, [envelope(f"many-{i}", 0) for i in range(start, start + 5000)])
    # At least once: under load an ack can come too late and a turn run twice.
    await wait_for(lambda: done >= total, f"{total} turns", within=60)
    watcher.cancel()
    # Sessions are kept only while something is held: the soft cap, plus at
    # most one keep-alive message per partition pulled past it.
    assert 0 < peak_sessions <= 500 + 8
    assert peak_dedupe == 1000
    assert worker.scheduler.session_count == 0
    assert worker.scheduler.held == 0


async def test_worker_arguments_are_checked(sb: SessionBus) -> None:
    async def handle(turn: Turn) -> None:
        return None

    with pytest.raises(ConfigError):
        Worker(sb, group="g", handler=handle, max_concurrency=0)
    with pytest.raises(ConfigError):
        Worker(sb, group="g", handler=handle, max_attempts=True)
    with pytest.raises(ConfigError):
        WorkerConfig(ack_wait=5, poll_interval=2, priority_timeout=6)
    with pytest.raises(ConfigError):
        WorkerConfig(lease_ttl=0.5)
    with pytest.raises(ConfigError):
        WorkerConfig(completion_ttl=0)
    with pytest.raises(ConfigError):
        WorkerConfig(completion_records="no")  # type: ignore[arg-type]
    worker = Worker(sb, group="g", handler=handle)
    assert worker.state is WorkerState.NEW
    with pytest.raises(WorkerError):
        _ = worker.scheduler
    first = Worker(sb, group="g", handler=handle, worker_id="same", config=FAST)
    await first.start()
    second = Worker(sb, group="g", handler=handle, worker_id="same", config=FAST)
    with pytest.raises(WorkerError, match="already has a live lease"):
        await second.start()
    await first.drain()


async def test_drain_finishes_running_turns_and_hands_back_the_rest_in_order(
    sb: SessionBus, start_worker: WorkerFactory
) -> None:
    started = asyncio.Event()
    finished: list[tuple[int, int]] = []

    async def handle(turn: Turn) -> None:
        idx = turn.envelope.event_data["idx"]
        if idx == 0:
            started.set()
            await asyncio.sleep(0.3)
        finished.append((idx, turn.attempt))

    worker = await start_worker(handle)
    await publish_many(sb, [envelope("dr", i) for i in range(3)])
    await asyncio.wait_for(started.wait(), 10)
    await wait_for(lambda: worker.scheduler.held == 3, "all three held")
    await worker.drain()
    assert worker.state is WorkerState.STOPPED
    assert finished == [(0, 1)]  # the running turn finished, the queued ones went back
    assert await sb.workers_kv.list(sb.names.worker_group_filter("g")) == []
    successor = await start_worker(handle)
    await wait_for(lambda: len(finished) == 3, "the handed-back envelopes")
    assert finished == [(0, 1), (1, 2), (2, 2)]  # in order, each delivered a second time
    assert await settled(sb) == (0, 0)
    await successor.drain()


async def test_closing_the_bus_stops_its_worker_and_leaves_no_listener_behind(
    nats_server: NatsServer, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await bus_factory(nats_server.url, partitions=8)
    states = bus.lifecycle.states

    async def handle(turn: Turn) -> None:
        return None

    worker = Worker(bus, group="g", handler=handle, config=FAST)
    await worker.start()
    await bus.close()  # the worker is one of the bus's services: stopped first
    assert worker.state is WorkerState.STOPPED
    other = await bus_factory(nats_server.url, partitions=8)
    assert await other.workers_kv.list(other.names.worker_group_filter("g")) == []  # it left
    caplog.clear()
    states.stale()  # as the connection's disconnect callback does while it drains
    assert not [r for r in caplog.records if "listener failed" in r.getMessage()]
