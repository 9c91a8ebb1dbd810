"""Sends whose acknowledgement never comes: sent again, and stored once.

Every send carries its envelope id as ``Nats-Msg-Id``, so the stream
stores a second copy of it as a duplicate of the first (within its
duplicate window): a send that got no answer can be sent again without
the risk of storing it twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest
from pausing import paused_until_logged, stream_leader
from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.bus.errors import BusTimeout, ConnectionFailed
from waiting import sigstop

from sessionbus.testing import BusFactory


async def _stored_ids(bus: SessionBus, session_id: str) -> list[str]:
    return [e.envelope_id async for e in bus.session(session_id, participant="reader").history()]


async def test_a_send_whose_answer_was_lost_is_sent_again_and_stored_once(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    session = await bus.open("lost-answer", participant="a", participants=["a", "b"])
    before = await session.send("before")
    async with paused_until_logged(nats_server, "got no answer; writing it again") as resume:
        sent = await session.send("while paused")
    # The first attempt was stored once the server resumed; its answer went
    # to a request no longer waited for, and the second attempt is its duplicate.
    assert resume.resumed
    after = await session.send("after")
    assert await _stored_ids(bus, "lost-answer") == [before, sent, after]


async def test_a_send_is_not_sent_again_past_the_streams_duplicate_window(
    nats_server: NatsServer, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0, duplicate_window=1.5)
    # A bus that finds the stream takes its window, whatever it was asked for.
    other = await bus_factory(nats_server.url, request_timeout=1.0, duplicate_window=600.0)
    assert bus.duplicate_window == other.duplicate_window == 1.5
    session = await other.open("short-window", participant="a", participants=["a", "b"])
    assert nats_server.pid is not None
    try:
        await sigstop(nats_server.pid)
        # A second attempt would end after the window: a copy of it stored by
        # then would not be known as a duplicate. It may have been stored.
        with caplog.at_level(logging.WARNING, logger="sessionbus"), pytest.raises(BusTimeout):
            await session.send("while paused")
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    assert "got no answer" not in caplog.text
    # The one attempt is stored once the server resumes; no answer tells
    # when, so the stream is read until it shows.
    deadline = time.monotonic() + 5.0
    while not (stored := await _stored_ids(other, "short-window")):
        assert time.monotonic() < deadline, "the one attempt was never stored"
        await asyncio.sleep(0.01)
    assert len(stored) == 1


async def test_a_send_rides_out_a_paused_stream_leader(
    nats_cluster: NatsCluster, bus_factory: BusFactory,
) -> None:
    first = await bus_factory(nats_cluster.urls, replicas=3)
    leader, survivor = await stream_leader(nats_cluster, first, first.names.envelope_stream)
    # Given longer than an election: the other replicas elect a new leader
    # 5-10 s after the pause here.
    bus = await bus_factory(survivor.url, replicas=3, request_timeout=_ELECTION)
    session = await bus.open("paused-leader", participant="a", participants=["a", "b"])
    before = await session.send("before")
    # The send either reaches the paused leader, which keeps its routes, and
    # gets no answer (sent again after the request timeout), or finds no
    # stream taking it once the leader is given up ("no responders": sent
    # again until a new leader takes it). Both happen; either way it is
    # stored once, and after what was sent before it.
    assert leader.pid is not None
    try:
        await sigstop(leader.pid)
        sent = await session.send("while the leader is paused")
    finally:
        os.kill(leader.pid, signal.SIGCONT)
    after = await session.send("after")
    assert await _stored_ids(bus, "paused-leader") == [before, sent, after]


@pytest.mark.parametrize("through", ["leader", "follower"])
async def test_a_send_whose_first_copy_a_resumed_leader_still_stores_is_acknowledged(
    nats_cluster: NatsCluster, bus_factory: BusFactory, through: str,
) -> None:
    first = await bus_factory(nats_cluster.urls, replicas=3)
    leader, other = await stream_leader(nats_cluster, first, first.names.envelope_stream)
    # A short pause: a leader paused for longer may step down as it resumes.
    bus = await bus_factory((leader if through == "leader" else other).url, replicas=3,
                            request_timeout=0.5)
    session = await bus.open("in-process", participant="a", participants=["a", "b"])
    # Resumed, the leader takes both attempts back to back: the second comes
    # while the first is still being stored, and is refused as "in process"
    # before it can be answered as the first's duplicate.
    async with paused_until_logged(leader, "got no answer; writing it again") as resume:
        try:
            sent = await session.send("while paused", idempotency_key="k")
        except (BusTimeout, ConnectionFailed):
            # The leader stepped down after all, and none took over in time:
            # what the README tells a caller to do then.
            sent = await session.send("while paused", idempotency_key="k")
    assert resume.resumed
    assert await _stored_ids(bus, "in-process") == [sent]


#: Seconds a request may take in the election tests.
_ELECTION = 15.0
