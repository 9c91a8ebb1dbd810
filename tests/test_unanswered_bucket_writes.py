"""Bucket writes whose acknowledgement never comes: sent again, stored once.

Every bucket write carries an id of its own (``Nats-Msg-Id``). A write
sent again is then taken as a duplicate of a copy stored before. A single
server checks a compare-and-set's revision before the id and refuses it:
the write then asks the server whether it knows the id. A replicated
stream checks the id first, so its refusal is the answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from nats.js import api
from pausing import paused_until_logged, stream_leader
from sessionbus.bus import SessionBus, SessionRegistry
from sessionbus.bus._kv import Bucket, bind_bucket
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.bus.errors import BusTimeout, KeyConflict
from waiting import sigstop, until

from sessionbus.testing import BusFactory

RESENT = "got no answer; writing it again"

T = TypeVar("T")


async def _bucket(bus: SessionBus, name: str = "resends") -> Bucket:
    return await bind_bucket(bus.nc, bus.js, name, replicas=bus.replicas, domain=None,
                             request_timeout=bus.settings.request_timeout)


async def _last_seq(bus: SessionBus, bucket: Bucket) -> int:
    return int((await bus.js.stream_info(bucket.stream)).state.last_seq)


async def _resent_while_paused(server: NatsServer, write: Awaitable[int]) -> int:
    """``write``'s revision, sent while ``server`` is paused until the write is sent again.

    Resumed, the server stores the first attempt and answers a request no
    longer waited for, then takes the second.
    """
    async with paused_until_logged(server, RESENT) as resume:
        revision = await write
    assert resume.resumed
    return revision


async def _stored_once(bus: SessionBus, bucket: Bucket, revision: int,
                       value: bytes | None) -> None:
    """``revision`` is the bucket's last, and the key holds ``value`` there (None: deleted)."""
    assert revision == await _last_seq(bus, bucket)
    entry = await bucket.get("k")
    if value is None:
        assert entry is None
    else:
        assert entry is not None and (entry.value, entry.revision) == (value, revision)


async def test_a_bucket_takes_its_streams_duplicate_window(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    bus = await bus_factory(nats_server.url)
    bucket = await _bucket(bus)
    assert bucket.duplicate_window == 120.0  # what a new bucket's stream gets
    info = await bus.js.stream_info(bucket.stream)
    await bus.js.update_stream(api.StreamConfig.from_response(
        {**info.config.as_dict(), "duplicate_window": 3_000_000_000}))
    assert (await _bucket(bus)).duplicate_window == 3.0


@pytest.mark.parametrize("op", ["put", "update", "delete"])
async def test_a_write_whose_answer_was_lost_is_sent_again_and_stored_once(
    nats_server: NatsServer, bus_factory: BusFactory, op: str,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    bucket = await _bucket(bus)
    created = await bucket.create("k", b"v1")
    # A plain write's second attempt is the first's duplicate, answered
    # with its revision and not stored again. A compare-and-set write's is
    # refused at the first attempt's revision, and the server, asked,
    # knows its id.
    writes: dict[str, Callable[[], Awaitable[int]]] = {
        "put": lambda: bucket.put("k", b"v2"),
        "update": lambda: bucket.update("k", b"v2", last=created),
        "delete": lambda: bucket.delete("k", last=created),
    }
    revision = await _resent_while_paused(nats_server, writes[op]())
    assert revision == created + 1
    await _stored_once(bus, bucket, revision, None if op == "delete" else b"v2")
    # A write based on the revision before still conflicts.
    with pytest.raises(KeyConflict):
        await bucket.update("k", b"v3", last=created)


@pytest.mark.parametrize("op", ["update", "insert"])
async def test_a_compare_and_set_replaced_before_it_was_sent_again_is_still_its_own(
    nats_server: NatsServer, bus_factory: BusFactory, op: str,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    bucket = await _bucket(bus)
    # Another writer on the same connection: the server takes its write
    # right after this write's first attempt, and before the second.
    other = await bind_bucket(bus.nc, bus.js, bucket.name, replicas=1, domain=None,
                              request_timeout=10.0)
    base = await bucket.create("k", b"v1") if op == "update" else await _last_seq(bus, bucket)
    ours = base + 1
    mine: dict[str, Callable[[], Awaitable[object]]] = {
        "update": lambda: bucket.update("k", b"mine", last=base),
        "insert": lambda: bucket.insert("k", b"mine"),
    }
    theirs: dict[str, Callable[[], Awaitable[int]]] = {
        "update": lambda: other.update("k", b"theirs", last=ours),
        "insert": lambda: other.delete("k", last=ours),
    }
    async with paused_until_logged(nats_server, RESENT) as resume:
        write = asyncio.create_task(mine[op]())
        await until(lambda: bucket.replies.waiting == 1, "the first attempt sent")
        replaced = asyncio.create_task(theirs[op]())
        await until(lambda: other.replies.waiting == 1, "the other write sent")
        # Sent again, it finds the key at the other write's revision; asked
        # whether its id is known, the server answers with its own revision.
        got = await write
    assert resume.resumed
    assert await replaced == ours + 1
    assert got == (ours if op == "update" else (ours, False))
    await _stored_once(bus, bucket, ours + 1, b"theirs" if op == "update" else None)


async def test_a_compare_and_set_that_was_never_stored_still_conflicts(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    bucket = await _bucket(bus)
    before = await _last_seq(bus, bucket)
    # Refused once the server resumes (the key holds nothing), its answer
    # lost; sent again, it is refused at revision 0, and the server does not
    # know its id.
    with pytest.raises(KeyConflict):
        await _resent_while_paused(nats_server, bucket.update("absent", b"v", last=1))
    assert await _last_seq(bus, bucket) == before


async def test_a_registry_record_written_while_the_server_is_paused_is_stored(
    nats_server: NatsServer, bus_factory: BusFactory,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    async with SessionRegistry(bus, node_id="node-a") as registry:
        await registry.register("call-1", "before")
        async with paused_until_logged(nats_server, RESENT) as resume:
            await registry.register("call-1", "while-paused")
        assert resume.resumed
        found = await registry.get_for_call("call-1")
        assert sorted(info.session_id for info in found) == ["before", "while-paused"]


async def test_a_write_is_not_sent_again_past_the_duplicate_window_or_when_told_not_to(
    nats_server: NatsServer, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    bus = await bus_factory(nats_server.url, request_timeout=1.0)
    bucket = await _bucket(bus)
    info = await bus.js.stream_info(bucket.stream)
    await bus.js.update_stream(api.StreamConfig.from_response(
        {**info.config.as_dict(), "duplicate_window": 1_500_000_000}))
    short = await _bucket(bus)
    assert short.duplicate_window == 1.5
    created = await short.create("k", b"v1")
    assert nats_server.pid is not None
    try:
        await sigstop(nats_server.pid)
        with caplog.at_level(logging.WARNING, logger="sessionbus"):
            # A second attempt would be waited for past the window.
            with pytest.raises(BusTimeout):
                await short.put("k", b"v2")
            # A caller that sends its writes again itself.
            with pytest.raises(BusTimeout):
                await bucket.update("k", b"v3", last=created, resend_unanswered=False)
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    assert RESENT not in caplog.text


async def _with_leader_paused(cluster: NatsCluster, bus_factory: BusFactory,
                              write: Callable[[Bucket, int], Awaitable[T]]) -> tuple[Bucket, T]:
    """``write(bucket, created)`` through a follower while the bucket stream's leader is paused.

    ``created`` is the revision of key ``k``, written before the pause. The
    write either reaches the paused leader, which keeps its routes, and
    gets no answer (sent again after the request timeout), or finds no
    stream taking it once the leader is given up ("no responders": sent
    again, paced). The other replicas elect a new leader 5-10 s after the
    pause here: requests are given 15 s.
    """
    first = await bus_factory(cluster.urls, replicas=3)
    await _bucket(first)
    leader, survivor = await stream_leader(cluster, first, "KV_resends")
    bus = await bus_factory(survivor.url, replicas=3, request_timeout=15.0)
    bucket = await _bucket(bus)
    created = await bucket.create("k", b"v1")
    assert leader.pid is not None
    try:
        await sigstop(leader.pid)
        return bucket, await write(bucket, created)
    finally:
        os.kill(leader.pid, signal.SIGCONT)


async def test_a_bucket_write_rides_out_a_paused_stream_leader(
    nats_cluster: NatsCluster, bus_factory: BusFactory,
) -> None:
    bucket, revision = await _with_leader_paused(
        nats_cluster, bus_factory,
        lambda bucket, created: bucket.update("k", b"v2", last=created))
    # The next write, through the new leader, follows it at once: it was
    # stored once, at that revision. (Right after the pause a stream info or
    # a Direct Get may still be answered by a replica that is behind.)
    assert await bucket.put("k", b"v3") == revision + 1


async def test_a_refused_write_whose_answer_was_lost_conflicts_on_a_replicated_bucket(
    nats_cluster: NatsCluster, bus_factory: BusFactory,
) -> None:
    # The create is refused (the key exists). A first attempt the paused
    # leader does not answer is sent again; the new leader knows nothing of
    # its id and refuses it again. A replicated stream checks the id before
    # the revision, so that refusal is the answer: nothing is asked of the
    # stream that only its replicas would check.
    async def create(bucket: Bucket, created: int) -> int:
        with pytest.raises(KeyConflict):
            await bucket.create("k", b"mine")
        return created

    bucket, created = await _with_leader_paused(nats_cluster, bus_factory, create)
    # The bucket still takes writes: nothing was stored, nothing is stuck.
    assert await bucket.put("k", b"v2") == created + 1
