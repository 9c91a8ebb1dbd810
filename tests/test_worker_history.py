"""turn.history(): exactly what was stored up to the turn's own envelope, served from the worker."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import cast

import pytest
from sessionbus.bus import SessionBus, _history
from sessionbus.bus._jsapi import AckNumbers, ack_numbers
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import ConfigError
from sessionbus.schemas import Envelope
from sessionbus.workers import Turn, Worker
from sessionbus.workers._historyseq import History
from sessionbus.workers._recent import RecentHistory
from waiting import until
from worker_proc import FAST

from sessionbus.testing import BusFactory

_until = functools.partial(until, within=15.0, every=0.01)


async def test_each_turn_sees_the_session_up_to_its_own_envelope(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    sb: SessionBus = await bus_factory(nats_server.url, partitions=4)
    seen: dict[str, list[str]] = {}

    async def handle(turn: Turn) -> None:
        seen[turn.envelope.content] = [e.content for e in await turn.history()]
        await asyncio.sleep(0.005)  # let later envelopes queue behind this turn

    session = await sb.open("hist", participant="client", participants=["g"])
    other = await sb.open("other", participant="client", participants=["g"])
    for i in range(3):  # stored before any worker of the group existed
        await session.send(f"m{i}")
        await other.send(f"o{i}")

    first = Worker(sb, group="g", handler=handle, config=FAST)
    await first.start()
    try:
        await _until(lambda: len(seen) == 6, "the stored envelopes handled")
        for i in range(3, 6):  # a burst: queued while earlier turns run
            await session.send(f"m{i}")
        await _until(lambda: len(seen) == 9, "the burst handled")
    finally:
        await first.stop()
    # A new worker of the group starts after m0..m5 were handled elsewhere:
    # what it serves from memory lacks them, and its turns must still see them.
    second = Worker(sb, group="g", handler=handle, config=FAST)
    await second.start()
    try:
        for i in range(6, 10):
            await session.send(f"m{i}")
        await _until(lambda: len(seen) == 13, "the second worker's turns")
        warm_before = second._recent.cold_reads
        await session.send("m10")
        await _until(lambda: "m10" in seen, "a turn of a session the worker has seen")
        assert second._recent.cold_reads == warm_before  # served from memory
    finally:
        await second.stop()
    for i in range(11):
        assert seen[f"m{i}"] == [f"m{j}" for j in range(i + 1)], i
    assert seen["o2"] == ["o0", "o1", "o2"]


def test_a_delivery_gap_drops_the_partitions_cached_sessions() -> None:
    recent = RecentHistory(per_session=4, total=100)

    def env(sid: str) -> Envelope:
        return Envelope(session_id=sid, sender_id="c", event_data={"text": "x"})

    recent.observe(0, 1, 10, "a", env("a"))
    recent.observe(0, 2, 11, "a", env("a"))
    recent.observe(1, 1, 12, "b", env("b"))
    assert recent.size == 3
    recent.observe(0, 5, 13, "a", env("a"))  # deliveries 3 and 4 went elsewhere
    assert recent.size == 2  # partition 0 dropped (a starts again at 13), partition 1 kept
    for seq in range(20, 30):
        recent.observe(1, seq - 18, seq, "b", env("b"))
    assert recent.size == 5  # b at its per-session bound of 4
    recent.drop_partition(1)
    assert recent.size == 1
    numbers = ack_numbers("$JS.ACK.S.C.1.42.7.1700000000.3")
    assert numbers == (1, 42, 7, 3)
    assert isinstance(numbers, AckNumbers)
    assert (numbers.delivered, numbers.stream_seq, numbers.consumer_seq, numbers.pending) == (
        1, 42, 7, 3)
    assert ack_numbers("$JS.ACK.dom.acc.S.C.1.42.9.1700000000.3.x") == (1, 42, 9, 3)
    assert ack_numbers("_INBOX.x") is None
    # The same subjects as the raw bytes a history read gets.
    assert ack_numbers(b"$JS.ACK.S.C.1.42.7.1700000000.3") == (1, 42, 7, 3)
    assert ack_numbers(b"$JS.ACK.dom.acc.S.C.1.42.9.1700000000.3.x") == (1, 42, 9, 3)
    assert ack_numbers(b"_INBOX.x.y.z.1.2.3.4.5") is None
    assert ack_numbers(b"$JS.ACK.S.C.1.4x.7.1700000000.3") is None
    assert ack_numbers("$JS.ACK.dom.acc.S.C.1.42.9.1700000000") is None  # 10 tokens


async def test_a_history_handed_out_stays_as_it_was() -> None:
    """A turn's history is a window on the worker's list: later intake never changes it."""
    recent = RecentHistory(per_session=4, total=100)
    envs = [Envelope(session_id="a", sender_id="c", event_data={"text": f"e{i}"})
            for i in range(1, 13)]
    no_bus = cast(SessionBus, None)  # served from memory: the bus is not used
    for seq in range(1, 4):
        recent.observe(0, seq, seq, "a", envs[seq - 1])
    first = await recent.history(no_bus, "a", 3)
    at_two = await recent.history(no_bus, "a", 2)
    for seq in range(4, 13):  # past the bound of 4: old envelopes dropped, lists replaced
        recent.observe(0, seq, seq, "a", envs[seq - 1])
    assert first == envs[:3] and at_two == envs[:2]
    assert [e.content for e in first] == ["e1", "e2", "e3"]
    assert recent.size == 4
    recent.drop("a")  # the session left: what was handed out is still whole
    assert list(first) == envs[:3]


def test_history_reads_like_a_list_and_cannot_change() -> None:
    envs = [Envelope(session_id="a", sender_id="c", event_data={"text": f"e{i}"})
            for i in range(6)]
    window = History(envs, 1, 4)
    assert len(window) == 3 and list(window) == envs[1:4]
    assert window[0] is envs[1] and window[-1] is envs[3]
    assert window[1:] == envs[2:4] and window[::-1] == envs[3:0:-1] and window[5:] == []
    assert window == envs[1:4] and window != envs[1:5] and window == History(envs[1:4])
    assert window + [envs[0]] == [*envs[1:4], envs[0]]  # noqa: RUF005 (History + list)
    assert [envs[0]] + window == envs[:4]  # noqa: RUF005 (list + History on purpose)
    assert envs[2] in window and window.index(envs[3]) == 2 and window.count(envs[0]) == 0
    assert list(reversed(window)) == envs[3:0:-1]
    for bad in (3, -4):
        with pytest.raises(IndexError):
            window[bad]
    assert not hasattr(window, "append") and not hasattr(window, "__setitem__")
    with pytest.raises(TypeError):
        hash(window)
    assert History(envs) == envs and len(History([])) == 0


def test_iterating_a_history_stops_at_its_window_while_the_list_grows() -> None:
    """The worker appends while a turn iterates (with awaits): nothing past the window shows."""
    envs = [Envelope(session_id="a", sender_id="c", event_data={"text": f"e{i}"})
            for i in range(6)]
    items = envs[:3]
    for window, want in ((History(items), envs[:3]), (History(items, 1, 3), envs[1:3])):
        seen = []
        for e in window:
            seen.append(e)
            items.append(envs[len(items)])  # stored after the turn's own envelope
        assert seen == want
        del items[3:]
    assert list(History(items)) == envs[:3]



def test_a_session_at_its_bound_holds_at_most_a_quarter_more_in_its_lists() -> None:
    """Old envelopes dropped from the front are let go of soon, not after a whole bound."""
    per_session = 64
    recent = RecentHistory(per_session=per_session, total=10_000)
    env = Envelope(session_id="a", sender_id="c", event_data={"text": "x"})
    held = []
    for seq in range(1, per_session * 4):
        recent.observe(0, seq, seq, "a", env)
        entry = recent._entries["a"]
        held.append(len(entry.envelopes))
        assert len(entry.seqs) == len(entry.envelopes)
    assert recent.size == per_session
    assert max(held) <= per_session + per_session // 4


async def test_the_newest_envelopes_of_a_long_session_come_from_memory(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    sb: SessionBus = await bus_factory(nats_server.url, partitions=4)
    windows: dict[str, list[str]] = {}
    cold: dict[str, int] = {}
    refused: list[Exception] = []
    worker: Worker

    async def handle(turn: Turn) -> None:
        last = {"all": None, "more than stored": 100}.get(turn.envelope.content, 5)
        before = worker._recent.cold_reads
        windows[turn.envelope.content] = [e.content for e in await turn.history(last=last)]
        cold[turn.envelope.content] = worker._recent.cold_reads - before
        if turn.envelope.content == "m0":
            for bad in (0, -1, True, 2.0):
                try:
                    await turn.history(last=cast(int, bad))
                except ConfigError as e:
                    refused.append(e)

    session = await sb.open("long", participant="client", participants=["g"])
    worker = Worker(sb, group="g", handler=handle,
                    config=dataclasses.replace(FAST, history_per_session=8))
    await worker.start()
    try:
        for i in range(30):  # a conversation: each envelope once the last was handled
            await session.send(f"m{i}")
            await _until(lambda i=i: len(windows) == i + 1,  # type: ignore[misc]
                         "a windowed turn")
        await session.send("all")
        await session.send("more than stored")
        await _until(lambda: len(windows) == 32, "the whole-history turns")
    finally:
        await worker.stop()
    names = [f"m{i}" for i in range(30)]
    for i in range(30):
        assert windows[f"m{i}"] == names[max(0, i - 4):i + 1], i
    # Past its first turns (the gap before the worker first saw the session
    # is read once), a window the worker holds never reads the stream, though
    # the session is far past the 8 envelopes it keeps.
    assert sum(cold[f"m{i}"] for i in range(10, 30)) == 0
    assert windows["all"] == [*names, "all"]
    assert cold["all"] == 1  # the older part, no longer held, is read
    assert windows["more than stored"] == [*names, "all", "more than stored"]
    assert len(refused) == 4 and all(isinstance(e, ValueError) for e in refused)


def test_the_newest_of_a_history_is_a_window_on_the_same_list() -> None:
    items = [Envelope(session_id="s", event_data={"text": str(i)}) for i in range(10)]
    history = History(items, 2, 8)
    assert history.newest(3) == items[5:8]
    assert history.newest(6) == items[2:8] == history.newest(100) == history.newest(None)
    items.append(items[0])  # the list grows past the window: the window stays
    assert len(history.newest(3)) == 3 and history.newest(1)[0] is items[7]


async def test_a_cold_window_reads_from_where_it_starts_not_the_sessions_start(
    nats_server: NatsServer, bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No history kept (or a session not seen): last=N reads about N envelopes, up to the turn's."""
    sb: SessionBus = await bus_factory(nats_server.url, partitions=4)
    reads: list[int] = []
    original = _history.read_history

    async def counting(*args: object, **kwargs: object) -> object:
        found = await original(*args, **kwargs)  # type: ignore[arg-type]
        reads.append(len(found))
        return found

    monkeypatch.setattr(_history, "read_history", counting)
    session = await sb.open("cold", participant="client", participants=["g", "x"])
    for i in range(300):  # for another participant: the group takes no turn for them
        await session.send(f"x{i}", audience=["x"])
    started, go = asyncio.Event(), asyncio.Event()
    windows: list[list[str]] = []

    async def handle(turn: Turn) -> None:
        started.set()
        await go.wait()
        windows.append([e.content for e in await turn.history(last=5)])

    worker = Worker(sb, group="g", handler=handle,
                    config=dataclasses.replace(FAST, history_total=0))
    await worker.start()
    try:
        await session.send("for g", audience=["g"])
        await asyncio.wait_for(started.wait(), 15)
        for i in range(20):  # stored after the turn's own: not in its history
            await session.send(f"later{i}", audience=["x"])
        reads.clear()
        go.set()
        await _until(lambda: len(windows) == 1, "the turn")
    finally:
        await worker.stop()
    assert windows == [["x296", "x297", "x298", "x299", "for g"]]
    assert reads == [5]
    # A worker's memory that has not seen the session reads the same way.
    seq = (await sb.js.get_last_msg(sb.names.envelope_stream,
                                    sb.names.stored("cold", sb.partitions))).seq
    reads.clear()
    recent = RecentHistory(per_session=8, total=100)
    window = await recent.history(sb, "cold", seq, last=3)
    assert [e.content for e in window] == ["later17", "later18", "later19"]
    assert reads == [3] and recent.cold_reads == 1
