"""Reading a session's stored envelopes by stream sequence: exact on every server path.

``read_history`` reads a first Direct Get page and hands a long rest to a
short-lived push consumer (``bus/_seqread.py``). The page sizes and the
hand-over point are lowered here so that a few dozen envelopes cross every
path: the first page, the consumer, and Direct Get pages when the consumer
is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import pytest
from faults.proxy import LinkProxy
from sessionbus.bus import SessionBus, _history, _seqread, _states
from sessionbus.bus._history import read_history
from sessionbus.bus._names import MSG_ID_HEADER
from sessionbus.bus._rawsub import RawInbox
from sessionbus.bus._seqread import UntrustedDeliveries, read_range
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.bus.errors import BusError, BusTimeout, ConfigError
from sessionbus.schemas import Envelope, encode
from sessionbus.workers import Turn, Worker
from worker_proc import FAST

from sessionbus.testing import BusFactory, LeafTopology


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """First page 4, later pages 8, a consumer past 6 still to come.

    Returns how each consumer hand-over ended ("read" or the error's name).
    """
    monkeypatch.setattr(_seqread, "FIRST_PAGE", 4)
    monkeypatch.setattr(_seqread, "PAGE", 8)
    monkeypatch.setattr(_seqread, "CONSUMER_PAST", 6)
    outcomes: list[str] = []
    consume = _seqread._consume

    async def watched(*args: Any, **kwargs: Any) -> None:
        try:
            await consume(*args, **kwargs)
        except Exception as e:
            outcomes.append(type(e).__name__)
            raise
        outcomes.append("read")

    monkeypatch.setattr(_seqread, "_consume", watched)
    return outcomes


async def _store(sb: SessionBus, sid: str, texts: list[str]) -> list[int]:
    """Store one envelope per text in ``sid``, pipelined; their stream sequences."""
    futures = []
    for text in texts:
        env = Envelope(session_id=sid, sender_id="client", event_data={"text": text})
        futures.append(await sb.js.publish_async(sb.names.inbound(sid), encode(env),
                                                 headers={MSG_ID_HEADER: env.envelope_id}))
    return [ack.seq for ack in await asyncio.gather(*futures)]


async def _consumers(sb: SessionBus) -> int:
    return (await sb.js.stream_info(sb.names.envelope_stream)).state.consumer_count


async def _interleaved(sb: SessionBus, n: int) -> dict[str, list[tuple[int, str]]]:
    """Sessions a and b, ``n`` envelopes each, stored alternately in small runs."""
    await sb.open("a", participant="client")
    await sb.open("b", participant="client")
    stored: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
    for run in range(0, n, 5):
        for sid in ("a", "b"):
            texts = [f"{sid}{i}" for i in range(run, min(n, run + 5))]
            stored[sid] += zip(await _store(sb, sid, texts), texts, strict=True)
    return stored


def _texts(found: list[tuple[int, Envelope]]) -> list[tuple[int, str]]:
    return [(seq, e.content) for seq, e in found]


async def test_every_range_reads_exactly_what_is_stored_in_it(
    bus: SessionBus, small_pages: list[str],
) -> None:
    stored = await _interleaved(bus, 40)
    before = await _consumers(bus)
    a = stored["a"]
    assert _texts(await read_history(bus, "a")) == a  # first page, then a consumer
    assert _texts(await read_history(bus, "b")) == stored["b"]
    assert small_pages == ["read", "read"]
    seqs = [seq for seq, _ in a]
    for after, up_to in [(0, seqs[2]), (0, seqs[20]), (seqs[3], seqs[30]), (seqs[3], None),
                         (seqs[10], seqs[10]), (seqs[10], seqs[11] - 1), (seqs[39], None),
                         (seqs[5] + 1, seqs[25] - 1), (0, seqs[0] - 1)]:
        want = [(s, t) for s, t in a if s > after and (up_to is None or s <= up_to)]
        assert _texts(await read_history(bus, "a", after=after, up_to=up_to)) == want, (
            after, up_to)
    # Nothing from the future: what is stored after up_to stays out, even
    # when it was stored before the read.
    later = await _store(bus, "a", ["late"])
    assert _texts(await read_history(bus, "a", up_to=seqs[-1])) == a
    assert _texts(await read_history(bus, "a"))[-1] == (later[0], "late")
    # The consumers of these reads go away by themselves (the reader cannot
    # delete a consumer of the envelope stream).
    deadline = time.monotonic() + _seqread._LINGER + 10
    while await _consumers(bus) > before:
        assert time.monotonic() < deadline, "history consumers left behind"
        await asyncio.sleep(0.2)


@pytest.mark.usefixtures("small_pages")
async def test_headers_stored_with_an_envelope_do_not_pass_for_the_servers(
    bus: SessionBus,
) -> None:
    """A raw publish can store any header; a Direct Get reply adds the server's after them."""
    await bus.open("f", participant="client")
    first = await _store(bus, "f", ["f0", "f1"])
    forged = Envelope(session_id="f", sender_id="client", event_data={"text": "forged"})
    ack = await bus.js.publish(bus.names.inbound("f"), encode(forged), headers={
        "Nats-Sequence": "999999", "Nats-Num-Pending": "0", "Nats-Last-Sequence": "999999"})
    rest = await _store(bus, "f", ["f3", "f4", "f5"])
    want = list(zip([*first, ack.seq, *rest], ["f0", "f1", "forged", "f3", "f4", "f5"],
                    strict=True))
    assert _texts(await read_history(bus, "f")) == want
    # Bounded as a turn reads: a forged sequence past the bound must not end it early.
    assert _texts(await read_history(bus, "f", up_to=rest[1])) == want[:5]
    envelopes, cursor = await bus.session("f").history_page(after=first[0])
    assert [e.content for e in envelopes] == ["f1", "forged", "f3", "f4", "f5"]
    assert cursor == rest[-1]


@pytest.mark.usefixtures("small_pages")
async def test_undecodable_messages_are_skipped_in_place(
    bus: SessionBus, caplog: pytest.LogCaptureFixture,
) -> None:
    await bus.open("m", participant="client")
    first = await _store(bus, "m", [f"m{i}" for i in range(10)])
    bad = await bus.js.publish(bus.names.inbound("m"), b"\xc1 not msgpack")
    empty = await bus.js.publish(bus.names.inbound("m"), b"")
    rest = await _store(bus, "m", [f"m{i}" for i in range(10, 20)])
    want = list(zip(first + rest, [f"m{i}" for i in range(20)], strict=True))
    with caplog.at_level(logging.WARNING, logger="sessionbus.bus._history"):
        assert _texts(await read_history(bus, "m")) == want
        assert _texts(await read_history(bus, "m", after=first[8])) == want[9:]
    skipped = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert any(f"stream sequence {bad.seq}:" in m for m in skipped)
    assert any(f"stream sequence {empty.seq}:" in m for m in skipped)


async def test_a_refused_consumer_leaves_the_read_to_direct_get(
    bus: SessionBus, small_pages: list[str],
) -> None:
    stored = await _interleaved(bus, 30)
    # The stream takes no more consumers: the hand-over is refused by the server.
    held = await bus.js.subscribe(bus.names.history_filter("b"),
                                  stream=bus.names.envelope_stream, ordered_consumer=True)
    info = await bus.js.stream_info(bus.names.envelope_stream)
    config = info.config
    config.max_consumers = info.state.consumer_count
    assert config.max_consumers >= 1
    updated = await bus.js.update_stream(config)
    assert updated.config.max_consumers == config.max_consumers
    calls: list[int] = []
    converted = await read_range(
        bus.nc, lambda seq, data, headers: calls.append(seq) or seq,
        stream=bus.names.envelope_stream, subject_filter=bus.names.history_filter("a"),
        api_prefix=bus.api_prefix,
    )
    assert converted == [(s, s) for s, _ in stored["a"]]
    assert calls == [s for s, _ in stored["a"]]  # each converted once, in order
    assert _texts(await read_history(bus, "b")) == stored["b"]
    assert small_pages == ["JetStreamAPIError", "JetStreamAPIError"]
    await held.unsubscribe()


async def test_a_long_history_reads_whole_with_the_default_pages(bus: SessionBus) -> None:
    await bus.open("long", participant="client")
    n = _seqread.FIRST_PAGE + _seqread.CONSUMER_PAST + 300
    seqs = await _store(bus, "long", [f"t{i}" for i in range(n)])
    found = await read_history(bus, "long")
    assert [seq for seq, _ in found] == seqs
    assert [e.content for _, e in found] == [f"t{i}" for i in range(n)]
    cut = seqs[n // 2]
    assert [seq for seq, _ in await read_history(bus, "long", up_to=cut)] == seqs[:n // 2 + 1]


@pytest.mark.parametrize("cached", [0, 5], ids=["cold", "gap"])
async def test_turns_see_what_was_stored_up_to_their_own_envelope(
    bus: SessionBus, small_pages: list[str], cached: int,
) -> None:
    """Every read cold (no cache), or a cache of 5 so the rest is a gap read each turn."""
    seen: dict[str, list[str]] = {}
    release = asyncio.Event()

    async def handle(turn: Turn) -> None:
        seen[turn.envelope.content] = [e.content for e in await turn.history()]
        await release.wait()  # later envelopes are stored while this turn runs

    session = await bus.open("w", participant="client", participants=["g"])
    texts = [f"e{i}" for i in range(24)]
    await _store(bus, "w", texts[:12])
    config = dataclasses.replace(FAST, history_per_session=cached, history_total=cached)
    worker = Worker(bus, group="g", handler=handle, config=config)
    await worker.start()
    try:
        await _store(bus, "w", texts[12:])
        release.set()
        deadline = time.monotonic() + 20
        while len(seen) < len(texts):
            assert time.monotonic() < deadline, sorted(seen)
            await asyncio.sleep(0.02)
    finally:
        await worker.stop()
    for i, text in enumerate(texts):
        assert seen[text] == texts[:i + 1], text
    assert "read" in small_pages  # the long reads went through a consumer
    assert session.session_id == "w"


async def test_a_long_read_of_large_envelopes_is_flow_controlled(
    bus: SessionBus, small_pages: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server waits for flow control answers past a few MB: the read answers them."""
    requests: list[bytes] = []
    deliver = RawInbox._deliver

    def counted(self: RawInbox, subject: bytes, reply: bytes, data: bytes,
                headers: bytes | None) -> None:
        if not data and reply and (headers or b"").startswith(b"NATS/1.0 100"):
            requests.append(reply)
        deliver(self, subject, reply, data, headers)

    monkeypatch.setattr(RawInbox, "_deliver", counted)
    await bus.open("big", participant="client")
    body = "x" * 60_000
    seqs = await _store(bus, "big", [f"{i}:{body}" for i in range(250)])
    found = await read_history(bus, "big")
    assert [seq for seq, _ in found] == seqs
    assert [e.content.split(":")[0] for _, e in found] == [str(i) for i in range(250)]
    assert small_pages == ["read"] and requests  # flow control asked, and answered


async def test_a_client_of_a_leaf_node_reads_through_the_hubs_domain(
    nats_leaf: LeafTopology, bus_factory: BusFactory, small_pages: list[str],
) -> None:
    hub = await bus_factory(nats_leaf.hub.url, domain="hub")
    edge = await bus_factory(nats_leaf.leaf.url, domain="hub")
    stored = await _interleaved(hub, 30)
    assert _texts(await read_history(edge, "a")) == stored["a"]
    seqs = [seq for seq, _ in stored["b"]]
    assert _texts(await read_history(edge, "b", after=seqs[2], up_to=seqs[25])) == (
        stored["b"][3:26])
    assert small_pages == ["read", "read"]  # the consumer delivered across the leaf


async def test_a_long_read_on_a_replicated_stream(
    nats_cluster: NatsCluster, bus_factory: BusFactory, small_pages: list[str],
) -> None:
    """Three replicas: the hand-over consumer is placed by the cluster, the read is the same."""
    sb = await bus_factory(nats_cluster.urls, replicas=3)
    # A stream just created elects its leader first. The bus's own send waits
    # for one; the raw publishes below would not.
    await (await sb.open("first", participant="client")).send("led")
    stored = await _interleaved(sb, 30)
    assert _texts(await read_history(sb, "a")) == stored["a"]
    assert small_pages == ["read"]


async def test_an_unknown_ack_subject_ends_the_consumer_and_direct_get_reads_on(
    bus: SessionBus, small_pages: list[str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delivery whose ack subject does not parse is a typed error, never IndexError."""
    found = _seqread._Range(lambda seq, data, headers: seq, None)
    for reply in (b"", b"_INBOX.a.b", b"$JS.ACK.S.C.1.x.1.1700000000.0", b"$JS.ACK.S.C.1.2.3",
                  b"$JS.NAK.S.C.1.2.1.1700000000.0", b".7.1.0.0"):
        with pytest.raises(UntrustedDeliveries) as raised:
            found.on_pushed(reply, b"", None)
        assert isinstance(raised.value, BusError)
    assert not found.on_pushed(b"$JS.ACK.S.C.1.42.1.1700000000.5", b"", None)
    assert found.on_pushed(b"$JS.ACK.d.h.S.C.1.43.2.1700000000.0.t", b"", None)
    assert found.out == [(42, 42), (43, 43)]
    # After the first delivery only the numbers past its start are split off:
    # they are checked all the same.
    found = _seqread._Range(lambda seq, data, headers: seq, None)
    assert not found.on_pushed(b"$JS.ACK.S.C.1.42.1.1700000000.5", b"", None)
    for reply in (b"$JS.ACK.S.C.1.x.2.1700000000.4", b"$JS.ACK.S.C.1.43.2.1700000000",
                  b"$JS.ACK.S.C.1.43.2.1700000000.4.5"):
        with pytest.raises(UntrustedDeliveries):
            found.on_pushed(reply, b"", None)
    assert not found.on_pushed(b"$JS.ACK.S.C.1.43.2.1700000000.4", b"", None)
    with pytest.raises(UntrustedDeliveries, match="from 2 to 4"):
        found.on_pushed(b"$JS.ACK.S.C.1.45.4.1700000000.2", b"", None)
    assert found.on_pushed(b"$JS.ACK.S.C.2.44.3.1700000000.0", b"", None)  # another start
    assert found.out == [(42, 42), (43, 43), (44, 44)]
    # In a read: the consumer phase ends at the odd delivery and Direct Get reads the rest.
    await bus.open("odd", participant="client")
    seqs = await _store(bus, "odd", [f"o{i}" for i in range(30)])
    on_pushed = _seqread._Range.on_pushed

    def odd_tenth(self: _seqread._Range[Any], reply: bytes, data: bytes,
                  headers: bytes | None) -> bool:
        if self.got == 10:
            reply = b"_INBOX.not.an.ack"
        return on_pushed(self, reply, data, headers)

    monkeypatch.setattr(_seqread._Range, "on_pushed", odd_tenth)
    with caplog.at_level(logging.WARNING, logger="sessionbus.bus._seqread"):
        found_all = await read_history(bus, "odd")
    assert _texts(found_all) == list(zip(seqs, [f"o{i}" for i in range(30)], strict=True))
    assert small_pages == ["UntrustedDeliveries"]
    assert any("unknown ack subject" in r.getMessage() for r in caplog.records)


async def test_a_short_bounded_read_of_a_long_session_needs_no_consumer(
    bus: SessionBus, small_pages: list[str],
) -> None:
    """Much is stored after ``up_to``: only what is left up to it decides the hand-over."""
    await bus.open("short", participant="client")
    texts = [f"s{i}" for i in range(40)]
    seqs = await _store(bus, "short", texts)
    stored = list(zip(seqs, texts, strict=True))
    # First page 4, then 4 left up to the bound (under CONSUMER_PAST 6), 32 after it.
    assert _texts(await read_history(bus, "short", up_to=seqs[7])) == stored[:8]
    assert _texts(await read_history(bus, "short", after=seqs[9], up_to=seqs[19])) == (
        stored[10:20])
    assert small_pages == []  # Direct Get only
    assert _texts(await read_history(bus, "short", up_to=seqs[30])) == stored[:31]
    assert small_pages == ["read"]  # a long rest still goes to a consumer



@pytest.mark.parametrize("silent", [_seqread._SILENT, _seqread.API_TIMEOUT],
                         ids=["default", "gap-check-only"])
async def test_a_link_cut_while_a_consumer_delivers_loses_nothing(
    nats_server: NatsServer, bus_factory: BusFactory, small_pages: list[str],
    monkeypatch: pytest.MonkeyPatch, silent: float,
) -> None:
    """What the server wrote to the dead connection is read again, never left out.

    The consumer's heartbeat is short, so a consumer stalled by the cut
    resumes soon after the reconnect, past what was lost: the case that
    returned a range with a hole. With the silence check held off, only
    the delivery sequence check can see the loss.
    """
    monkeypatch.setattr(_seqread, "PAGE", 2048)  # the read on after the cut: a few pages
    monkeypatch.setattr(_seqread, "_HEARTBEAT", 0.3)
    monkeypatch.setattr(_seqread, "_SILENT", silent)
    n, cut_at = 3000, 300
    on_pushed = _seqread._Range.on_pushed
    with LinkProxy(target_port=nats_server.port) as proxy:
        sb = await bus_factory(proxy.url)
        await sb.open("cut", participant="client")
        texts = [f"c{i}:{'x' * 1000}" for i in range(n)]
        stored = list(zip(await _store(sb, "cut", texts), texts, strict=True))
        cuts: list[int] = []

        def cut_midway(self: _seqread._Range[Any], reply: bytes, data: bytes,
                       headers: bytes | None) -> bool:
            if self.got == cut_at and not cuts:
                cuts.append(self.got)
                proxy.cut()  # the client's read loop waits meanwhile: the socket dies mid-flow
                proxy.restore()
            return on_pushed(self, reply, data, headers)

        monkeypatch.setattr(_seqread._Range, "on_pushed", cut_midway)
        found = await asyncio.wait_for(read_history(sb, "cut"), 20)
    assert cuts == [cut_at]
    assert len(found) == n, f"{n - len(found)} envelopes left out"
    assert _texts(found) == stored  # every one, in order
    # The consumer was used once, and the loss was seen by whichever check came
    # first: the skipped delivery, the silence, or a status after the reconnect.
    assert small_pages in (["UntrustedDeliveries"], ["read"], ["JetStreamAPIError"]), small_pages


async def test_a_read_remembers_each_depth_within_the_bound(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A reply to any envelope a read returned needs no scan for its depth; the
    # memory keeps the most recently read (or re-read) envelopes.
    monkeypatch.setattr(_states, "DEPTH_SIZE", 6)
    await bus.open("a", participant="client")
    await _store(bus, "a", [f"m{i}" for i in range(4)])
    first = [e for _, e in await read_history(bus, "a")]
    assert [bus.lifecycle.known_depth("a", e.envelope_id) for e in first] == [0] * 4
    assert bus.lifecycle.known_depth("b", first[0].envelope_id) is None  # not b's
    await _store(bus, "a", ["m4", "m5", "m6"])
    everything = [e for _, e in await read_history(bus, "a", after=0)]
    # The second read refreshes m0-m3 and adds m4-m6: seven for six places, so
    # m0, the least recently read, goes.
    assert bus.lifecycle.known_depth("a", everything[0].envelope_id) is None
    assert all(bus.lifecycle.known_depth("a", e.envelope_id) == 0 for e in everything[1:])
    # A read of another session's envelope, then a re-read of all of a's: the
    # re-read makes a's the most recent, in their order, so b's envelope and
    # a's first (seven for six places again) are the ones that go.
    await bus.open("b", participant="client")
    await _store(bus, "b", ["x0"])
    (_, other), = await read_history(bus, "b")
    assert bus.lifecycle.known_depth("b", other.envelope_id) == 0
    again = [e for _, e in await read_history(bus, "a")]
    assert again == everything
    assert bus.lifecycle.known_depth("b", other.envelope_id) is None
    assert bus.lifecycle.known_depth("a", again[0].envelope_id) is None
    assert all(bus.lifecycle.known_depth("a", e.envelope_id) == 0 for e in again[1:])


async def test_a_read_that_must_reach_a_sequence_waits_for_a_replica_that_is_behind(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As when a follower that has not applied the newest messages answers the Direct Get."""
    await bus.open("behind", participant="client")
    seqs = await _store(bus, "behind", ["a", "b", "c"])
    # Two stored a little later: the read that must reach the second waits for both.
    later = asyncio.get_running_loop().call_later(
        0.1, lambda: asyncio.ensure_future(_store(bus, "behind", ["d", "e"])))
    found = await read_history(bus, "behind", must_reach=seqs[-1] + 2)
    later.cancel()
    assert [e.content for _, e in found] == ["a", "b", "c", "d", "e"]
    assert found[-1][0] == seqs[-1] + 2
    # A message past up_to shows the replica holds everything up to it: no
    # wait, though what must be reached is gone (deleted, expired).
    await bus.js.delete_msg(bus.names.envelope_stream, found[3][0])
    start = time.monotonic()
    shown = await read_history(bus, "behind", up_to=found[3][0], must_reach=found[3][0])
    assert [e.content for _, e in shown] == ["a", "b", "c"]
    assert time.monotonic() - start < _seqread.BEHIND_FOR / 2
    monkeypatch.setattr(_seqread, "BEHIND_FOR", 0.3)
    # Gone, with nothing after it: after BEHIND_FOR the stream's leader says
    # so, and the read is what it is.
    await bus.js.delete_msg(bus.names.envelope_stream, found[-1][0])
    assert [e.content for _, e in await read_history(
        bus, "behind", must_reach=found[-1][0])] == ["a", "b", "c"]
    # Held by the leader and never reached (here: not on the session's
    # filter at all): a typed error, not a short history.
    await bus.open("other", participant="client")
    elsewhere = await _store(bus, "other", ["x"])
    with pytest.raises(BusTimeout, match="though"):
        await read_history(bus, "behind", must_reach=elsewhere[0])
    # At or before ``after`` it bounds nothing this read covers: no wait.
    start = time.monotonic()
    assert await read_history(bus, "behind", after=elsewhere[0],
                              must_reach=elsewhere[0]) == []
    assert time.monotonic() - start < _seqread.BEHIND_FOR


async def test_a_client_reads_the_newest_envelopes_from_where_they_start(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = await _interleaved(bus, 400)
    session = bus.session("a", participant="client")
    reads: list[int] = []  # how many envelopes each read brought
    original = _history.read_history

    async def counting(*args: Any, **kwargs: Any) -> Any:
        found = await original(*args, **kwargs)
        reads.append(len(found))
        return found

    monkeypatch.setattr(_history, "read_history", counting)
    texts = [text for _, text in stored["a"]]
    for last in (1, 2, 37, 399, 400, 401, 10_000):
        reads.clear()
        assert [e.content async for e in session.history(last=last)] == texts[-last:]
        assert reads == [min(last, 400)]  # from the first of them, not the session's start
    # With a cursor: the newest of what came after it, all of it when fewer.
    cursor = stored["a"][389][0]
    assert [e.content async for e in session.history(after=cursor, last=5)] == texts[-5:]
    assert [e.content async for e in session.history(after=cursor, last=50)] == texts[390:]
    for bad in (0, -1, True, 1.5, "3"):
        with pytest.raises(ConfigError):
            session.history(last=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            await session.history_page(last=bad)  # type: ignore[arg-type]
    empty = await bus.open("empty", participant="client")
    assert [e async for e in empty.history(last=3)] == []
    assert await empty.history_page(last=3) == ([], 0)


async def test_the_newest_a_participant_receives_read_further_back_as_needed(
    bus: SessionBus,
) -> None:
    session = await bus.open("mixed", participant="client", participants=["client", "x", "y"])
    for i in range(120):
        await session.send(f"m{i}", audience=["x"] if i % 10 == 0 else ["y"])
    for_x = [e.content async for e in session.history("x")]
    assert len(for_x) == 12
    assert [e.content async for e in session.history("x", last=5)] == for_x[-5:]
    assert [e.content async for e in session.history("x", last=12)] == for_x
    assert [e.content async for e in session.history("x", last=13)] == for_x
    # A view that opens on the end of the session, then polls for what is new.
    page, cursor = await session.history_page(last=3)
    assert [e.content for e in page] == ["m117", "m118", "m119"]
    assert await session.history_page(after=cursor) == ([], cursor)
    await session.send("new")
    page, later = await session.history_page(after=cursor)
    assert [e.content for e in page] == ["new"] and later > cursor


async def test_the_newest_envelopes_on_a_replicated_stream(
    nats_cluster: NatsCluster, bus_factory: BusFactory,
) -> None:
    sb = await bus_factory(nats_cluster.urls, replicas=3)
    await (await sb.open("first", participant="client")).send("led")
    stored = await _interleaved(sb, 60)
    session = sb.session("b", participant="client")
    assert [e.content async for e in session.history(last=7)] == [
        text for _, text in stored["b"][-7:]]
    # A send is among the newest read right after it, whichever replica answers.
    sent = await session.send("mine")
    assert [e.envelope_id async for e in session.history(last=1)] == [sent]


async def test_the_newest_up_to_a_sequence_while_another_client_appends(
    nats_server: NatsServer, bus: SessionBus, bus_factory: BusFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Appends during the search push its start, never past up_to; each window is exact."""
    s = await bus.open("growing", participant="c")
    for i in range(200):
        await s.send(f"m{i}")
    stored = await read_history(bus, "growing")
    writer = (await bus_factory(nats_server.url)).session("growing", participant="w")
    starts: list[tuple[int, int]] = []  # (start, up_to) of each search
    search = _seqread.newest_start

    async def recording(*args: Any, **kwargs: Any) -> int:
        start = await search(*args, **kwargs)
        starts.append((start, kwargs["up_to"]))
        return start

    monkeypatch.setattr(_history, "newest_start", recording)

    async def write() -> None:
        for i in range(40):
            await asyncio.gather(*(writer.send(f"w{i}.{k}") for k in range(10)))

    writing = asyncio.create_task(write())
    try:
        for up_to_index, count in [(199, 1), (150, 7), (60, 25), (199, 50), (10, 3), (120, 120)]:
            up_to = stored[up_to_index][0]
            newest, _ = await _history.read_newest(bus, "growing", count, up_to=up_to,
                                                   must_reach=up_to)
            expected = [e.content for _, e in stored[:up_to_index + 1]][-count:]
            assert [e.content for e in newest] == expected, (up_to_index, count)
    finally:
        await writing
    assert starts and all(start < up_to for start, up_to in starts)
