"""Delegation depth is computed by the bus from the causation chain, never trusted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sessionbus.bus import SessionBus, _history, _seqread, _states
from sessionbus.bus._names import DEPTH_HEADER, MSG_ID_HEADER
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import CausationNotFound, DepthLimitExceeded
from sessionbus.schemas import Envelope, encode

from sessionbus.testing import BusFactory


async def depths(sb: SessionBus, session_id: str) -> dict[str, int]:
    return {e.envelope_id: e.depth async for e in sb.session(session_id).history()}


async def test_a_lying_client_cannot_reset_the_depth(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    hub = await bus_factory(nats_server.url)
    s = await hub.open("chain", participant="user", max_depth=3)
    root = await s.send("plan a trip")
    # Each hop comes from a fresh connection that never saw the causation
    # envelope, so the bus has to find its depth in the stored history.
    chain = [root]
    for hop in range(1, 4):
        agent = await bus_factory(nats_server.url)
        liar = agent.session("chain", participant=f"agent-{hop}")
        chain.append(await liar.send(f"hop {hop}", causation_id=chain[-1], depth=0))
    stored = await depths(hub, "chain")
    assert [stored[e] for e in chain] == [0, 1, 2, 3]
    fresh = await bus_factory(nats_server.url)
    with pytest.raises(DepthLimitExceeded) as exceeded:
        await fresh.session("chain", participant="agent-4").send(
            "one hop too many", causation_id=chain[-1], depth=0
        )
    assert (exceeded.value.depth, exceeded.value.limit) == (4, 3)
    assert exceeded.value.session_id == "chain"
    assert len(await depths(hub, "chain")) == 4  # nothing stored


async def test_depth_can_be_raised_but_not_past_the_limit(bus: SessionBus) -> None:
    s = await bus.open("raise", max_depth=2)
    root = await s.send("root")
    raised = await s.send("deeper than needed", causation_id=root, depth=2)
    assert (await depths(bus, "raise"))[raised] == 2
    with pytest.raises(DepthLimitExceeded):
        await s.send("no causation but too deep", depth=3)
    with pytest.raises(DepthLimitExceeded):
        await s.send("reply to a depth-2 envelope", causation_id=raised)


async def test_causation_must_be_in_the_session(bus: SessionBus) -> None:
    s = await bus.open("here")
    elsewhere = await bus.open("there")
    foreign = await elsewhere.send("not in 'here'")
    with pytest.raises(CausationNotFound) as missing:
        await s.send("reply", causation_id="no-such-envelope")
    assert missing.value.causation_id == "no-such-envelope"
    with pytest.raises(CausationNotFound):
        await s.send("reply", causation_id=foreign)  # cached, but from another session


async def test_depth_of_an_envelope_stored_by_another_client(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(nats_server.url)
    s = await sb.open("raw")
    # Stored by a plain nats-py publish: no depth header, only the body says 2.
    raw = Envelope(session_id="raw", sender_id="legacy", depth=2, event_data={"text": "x"})
    await sb.js.publish(sb.names.inbound("raw"), encode(raw),
                        headers={MSG_ID_HEADER: raw.envelope_id})
    other = await bus_factory(nats_server.url)
    reply = await other.session("raw").send("reply", causation_id=raw.envelope_id)
    assert (await depths(sb, "raw"))[reply] == 3
    assert s.metadata.max_depth == sb.settings.max_depth


async def test_depths_of_a_long_session_seen_by_a_fresh_client(
    nats_server: NatsServer, bus_factory: BusFactory, depth_scans: list[str],
) -> None:
    """One read of the session, past its first page and through a consumer, answers the rest."""
    sb = await bus_factory(nats_server.url)
    s = await sb.open("long", participant="user", max_depth=9)
    count = _seqread.FIRST_PAGE + _seqread.CONSUMER_PAST + 100
    sent = [await s.send(f"m{i}", depth=i % 5) for i in range(count)]
    # Late in the session, two written around the bus: no depth header, and
    # one that is not a number. Their bodies say 3 and 4.
    plain = Envelope(session_id="long", sender_id="legacy", depth=3)
    odd = Envelope(session_id="long", sender_id="legacy", depth=4)
    for envelope, headers in ((plain, {}), (odd, {DEPTH_HEADER: "x"})):
        await sb.js.publish(sb.names.inbound("long"), encode(envelope),
                            headers={MSG_ID_HEADER: envelope.envelope_id, **headers})
    sent.append(await s.send("last", depth=2))

    fresh = await bus_factory(nats_server.url)
    other = fresh.session("long", participant="agent")
    replies = {
        sent[1]: await other.send("re: early", causation_id=sent[1]),
        sent[-2]: await other.send("re: late", causation_id=sent[-2]),
        plain.envelope_id: await other.send("re: plain", causation_id=plain.envelope_id),
        odd.envelope_id: await other.send("re: odd", causation_id=odd.envelope_id),
        sent[-1]: await other.send("re: last", causation_id=sent[-1]),
    }
    # The first lookup remembered every depth: from the headers, and for the
    # two written around the bus, which came as headers only, from their
    # bodies, read once. The other lookups needed no read.
    assert depth_scans == ["long"]
    for i in (0, count // 2, count - 1):
        assert fresh.lifecycle.known_depth("long", sent[i]) == i % 5
    assert fresh.lifecycle.known_depth("other", sent[0]) is None
    stored = await depths(sb, "long")
    parents = {sent[1]: 1, sent[-2]: (count - 1) % 5, plain.envelope_id: 3,
               odd.envelope_id: 4, sent[-1]: 2}
    assert {parent: stored[reply] for parent, reply in replies.items()} == {
        parent: depth + 1 for parent, depth in parents.items()}
    with pytest.raises(CausationNotFound):
        await other.send("re: nothing", causation_id="f" * 32)
    assert depth_scans == ["long"] * 2  # an id the session does not hold: read for again


async def test_lookups_in_a_session_written_around_the_bus_read_only_what_is_new(
    nats_server: NatsServer, bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No depth headers at all: the bodies are read once, not on every lookup."""
    sb = await bus_factory(nats_server.url)
    await sb.open("legacy", participant="user")
    count = _seqread.CONSUMER_PAST * 4  # past the headers-only read's first page
    raw = [Envelope(session_id="legacy", sender_id="raw", depth=i % 4,
                    event_data={"text": "x" * 300}) for i in range(count)]
    acks = [await sb.js.publish_async(sb.names.inbound("legacy"), encode(e),
                                      headers={MSG_ID_HEADER: e.envelope_id}) for e in raw]
    await asyncio.gather(*acks)
    reads: list[tuple[int, int, bool]] = []  # (after, messages read, headers only)
    original = _history._read

    async def recording(*args: Any, **kwargs: Any) -> Any:
        out = await original(*args, **kwargs)
        reads.append((kwargs.get("after", 0), len(out), kwargs.get("headers_only", False)))
        return out

    monkeypatch.setattr(_history, "_read", recording)
    reader = await bus_factory(nats_server.url)
    assert await _history.find_depth(reader, "legacy", raw[-1].envelope_id) == (count - 1) % 4
    # The headers-only read, then the bodies it left behind, from the first of them.
    assert [(after, read) for after, read, _ in reads[:1]] == [(0, count)]
    assert reads[0][2] and not reads[1][2]
    assert 0 < reads[1][0] and reads[1][0] + reads[1][1] == acks[-1].result().seq
    assert all(reader.lifecycle.known_depth("legacy", e.envelope_id) == e.depth for e in raw)
    # A forged causation: nothing new to read.
    assert await _history.find_depth(reader, "legacy", "f" * 32) is None
    assert reads[2][1] == 0 and len(reads) == 3
    newer = Envelope(session_id="legacy", sender_id="raw", depth=3)
    await sb.js.publish(sb.names.inbound("legacy"), encode(newer),
                        headers={MSG_ID_HEADER: newer.envelope_id})
    assert await _history.find_depth(reader, "legacy", newer.envelope_id) == 3
    assert [read for _, read, _ in reads[3:]] == [1]  # its body came on the first page


async def test_a_lookup_reads_only_what_is_new_while_its_depths_are_remembered(
    nats_server: NatsServer, bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = await bus_factory(nats_server.url)
    s = await sb.open("seen", participant="user", max_depth=9)
    sent = [await s.send(f"m{i}", depth=i % 3) for i in range(20)]
    reads: list[tuple[int, int]] = []  # (after, messages read) of each lookup's read
    original = _history._read

    async def recording(*args: Any, **kwargs: Any) -> Any:
        out = await original(*args, **kwargs)
        reads.append((kwargs.get("after", 0), len(out)))
        return out

    monkeypatch.setattr(_history, "_read", recording)
    reader = await bus_factory(nats_server.url)
    assert await _history.find_depth(reader, "seen", "f" * 32) is None
    assert reads[-1][0] == 0 and reads[-1][1] == 20
    through = reader.lifecycle.states.begin_depth_scan("seen").seq
    assert through > 0
    # A forged causation again: only what is new is read (nothing).
    assert await _history.find_depth(reader, "seen", "e" * 32) is None
    assert reads[-1] == (through, 0)
    newer = await s.send("newer", depth=2)
    assert await _history.find_depth(reader, "seen", newer) == 2
    assert reads[-1] == (through, 1)

    # Another session's envelope carrying one of this session's ids takes its
    # place in the memory: the next lookup reads the whole session again.
    taken = sent[4]
    await sb.open("other", participant="user")
    await sb.js.publish(sb.names.inbound("other"), encode(Envelope(
        envelope_id=taken, session_id="other", sender_id="forger", depth=7)))
    assert [e.envelope_id async for e in reader.session("other").history()] == [taken]
    assert reader.lifecycle.known_depth("seen", taken) is None
    assert await _history.find_depth(reader, "seen", taken) == 4 % 3
    assert reads[-1] == (0, 21)

    # So does forgetting one of its depths to make room for others.
    states = reader.lifecycle.states
    monkeypatch.setattr(_states, "DEPTH_SIZE", len(states._depths) + 5)
    for i in range(10):
        states.remember_depth("elsewhere", f"e{i}", 0)
    assert reader.lifecycle.known_depth("seen", sent[0]) is None
    assert await _history.find_depth(reader, "seen", sent[0]) == 0
    assert reads[-1] == (0, 21)


async def test_the_read_notes_of_a_session_go_with_any_of_its_depths(bus: SessionBus,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   ) -> None:
    states = bus.lifecycle.states
    for i in range(3):
        states.remember_depth("s", f"s{i}", i)
    first = states.begin_depth_scan("s")
    states.end_depth_scan("s", first, 40)
    assert states.begin_depth_scan("s").seq == 40
    # Another session's depth noted under one of its ids: the note goes, and
    # a read begun before that does not set the note that replaces it.
    stale = states.begin_depth_scan("s")
    states.remember_depth("t", "s1", 5)
    assert states.begin_depth_scan("s").seq == 0
    states.end_depth_scan("s", stale, 50)
    assert states.begin_depth_scan("s").seq == 0
    states.end_depth_scan("s", states.begin_depth_scan("s"), 50)
    assert states.begin_depth_scan("s").seq == 50
    before = states.begin_depth_scan("s")
    monkeypatch.setattr(_states, "DEPTH_SIZE", len(states._depths))
    states.remember_depth("u", "u0", 0)  # makes room: the oldest, s0, goes
    assert states.known_depth("s", "s0") is None
    states.end_depth_scan("s", before, 60)
    assert states.begin_depth_scan("s").seq == 0


async def test_depths_written_around_the_bus_cannot_lie_or_crash_a_lookup(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    sb = await bus_factory(nats_server.url)
    victim = await sb.open("victim", participant="user", max_depth=3)
    root = await victim.send("root")
    deep = await victim.send("deep", causation_id=await victim.send(
        "mid", causation_id=await victim.send("one", causation_id=root)))
    await sb.open("attacker", participant="user")
    # Into its own session, a body that names the victim's session and
    # envelope with depth 0; and one with a depth header of 5,000 digits.
    forged = Envelope(envelope_id=deep, session_id="victim", sender_id="x", depth=0)
    await sb.js.publish(sb.names.inbound("attacker"), encode(forged))
    long_header = Envelope(session_id="attacker", sender_id="x", depth=2)
    await sb.js.publish(sb.names.inbound("attacker"), encode(long_header), headers={
        MSG_ID_HEADER: long_header.envelope_id, DEPTH_HEADER: "9" * 5000})

    reader = await bus_factory(nats_server.url)
    assert len([e async for e in reader.session("attacker").history()]) == 2
    async with reader.session("attacker").live(replay=True) as feed:
        async with asyncio.timeout(10):
            assert (await anext(feed)).envelope_id == deep
    assert reader.lifecycle.known_depth("victim", deep) is None
    with pytest.raises(DepthLimitExceeded):
        await reader.session("victim").send("one hop too many", causation_id=deep)
    fresh = await bus_factory(nats_server.url)  # remembers nothing: reads the headers
    reply = await fresh.session("attacker").send("re", causation_id=long_header.envelope_id)
    stored = {e.envelope_id: e.depth async for e in sb.session("attacker").history()}
    assert stored[reply] == 3  # the body's 2, + 1
    with pytest.raises(CausationNotFound):
        await reader.session("attacker").send("re", causation_id="\udc80")


async def test_a_lookup_reads_ids_and_depths_not_payloads(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    sb = await bus_factory(nats_server.url)
    s = await sb.open("heavy", participant="user")
    big = "x" * 32_000
    sent = [await s.send(big) for _ in range(60)]  # 1.9 MB of bodies
    fresh = await bus_factory(nats_server.url)
    before = fresh.nc.stats["in_bytes"]
    reply = await fresh.session("heavy").send("re", causation_id=sent[-1])
    read = fresh.nc.stats["in_bytes"] - before
    assert read < 200_000, read  # the first page's few bodies, then headers only
    assert all(fresh.lifecycle.known_depth("heavy", e) == 0 for e in sent)
    stored = {e.envelope_id: e.depth async for e in sb.session("heavy").history()}
    assert stored[reply] == 1


async def test_a_lookup_does_not_wait_for_an_envelope_gone_between_its_reads(
    nats_server: NatsServer, bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bodies' read stops where it stops: the note with it, no wait for what went."""
    sb = await bus_factory(nats_server.url)
    s = await sb.open("going", participant="user")
    for _ in range(60):  # past the headers-only read's first page
        await s.send("x" * 2000)
    plain = Envelope(session_id="going", sender_id="raw", depth=2)
    await sb.js.publish(sb.names.inbound("going"), encode(plain),
                        headers={MSG_ID_HEADER: plain.envelope_id})
    for _ in range(5):
        await s.send("y")
    fresh = await bus_factory(nats_server.url)
    original = _history._read
    gone: list[int] = []

    async def deleting(*args: Any, **kwargs: Any) -> Any:
        found = await original(*args, **kwargs)
        if kwargs.get("headers_only"):  # the newest goes (expired, deleted) before the bodies
            gone.append(found[-1][0])
            await sb.js.delete_msg(sb.names.envelope_stream, gone[0])
        return found

    monkeypatch.setattr(_history, "_read", deleting)
    async with asyncio.timeout(2):  # not the 5 s a read waits for a replica behind
        assert await _history.find_depth(fresh, "going", "f" * 32) is None
    assert fresh.lifecycle.known_depth("going", plain.envelope_id) == 2
    assert 0 < fresh.lifecycle.states.begin_depth_scan("going").seq < gone[0]
