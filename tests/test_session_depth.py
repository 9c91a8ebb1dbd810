"""Delegation depth is computed by the bus from the causation chain, never trusted."""

from __future__ import annotations

import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._names import MSG_ID_HEADER
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
