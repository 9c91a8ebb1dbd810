"""Delegation depth is computed by the bus from the causation chain, never trusted."""

from __future__ import annotations

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
    """One read of the session, past its first page and through a consumer, answers them all."""
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
    assert depth_scans == ["long"]  # the first lookup remembered every depth it passed
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
    assert depth_scans == ["long", "long"]  # an id the session does not hold: read for again


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
