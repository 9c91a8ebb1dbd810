"""Bucket: heads, markers, filtered listing, and writes through leaf nodes and domains."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import nats
import nats.errors
import pytest
from nats.js import api
from sessionbus.bus._kv import Bucket, KVEvent, KVOp, wire_ttl
from sessionbus.bus._server import NatsServer
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import ConnectionFailed, KeyConflict

from sessionbus.testing import LeafTopology

BusFactory = Callable[..., Awaitable[SessionBus]]
ServerFactory = Callable[..., NatsServer]


async def _until(condition: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


def test_wire_ttl_rounds_up_to_whole_seconds() -> None:
    assert [wire_ttl(t) for t in (0.001, 0.5, 1, 1.01, 30)] == [1, 1, 1, 2, 30]


async def test_head_tells_values_deletes_and_expiries_apart(bus: SessionBus) -> None:
    kv = bus.registry_kv
    assert await kv.head("never") is None
    rev = await kv.put("a.live", b"v")
    assert await kv.head("a.live") == KVEvent("a.live", KVOp.PUT, b"v", rev)
    deleted = await kv.delete("a.live")
    head = await kv.head("a.live")
    assert head is not None and (head.op, head.revision, head.value) == (KVOp.DELETE, deleted, b"")
    await kv.put("a.short", b"v", ttl=0.5)

    async def expired() -> bool:
        h = await kv.head("a.short")
        return h is not None and h.op is KVOp.EXPIRED

    await _until(expired)
    assert await kv.get("a.short") is None
    # A compare-and-set against the marker's revision writes the key again.
    marker = await kv.head("a.short")
    assert marker is not None
    await kv.update("a.short", b"again", last=marker.revision)
    assert (await kv.get("a.short")).value == b"again"  # type: ignore[union-attr]
    assert await kv.revision() >= marker.revision + 1


async def test_a_read_takes_the_servers_headers_over_forged_ones(bus: SessionBus) -> None:
    """A value written around the bus may carry any headers; the server's own say where it is."""
    kv = bus.registry_kv
    first = await kv.put("f.forged", b"one")
    ack = await bus.js.publish(kv.subject("f.forged"), b"two", headers={
        "Nats-Sequence": str(first), "Nats-Subject": "$KV.other.key", "Nats-Stream": "X"})
    entry = await kv.get("f.forged")
    assert entry is not None and (entry.value, entry.revision) == (b"two", ack.seq)
    assert entry.revision != first
    # A get of a key that holds nothing: one request answered 404, not an error.
    assert await kv.get("f.never") is None
    assert await kv.head("f.never") is None


async def test_list_filters_on_the_server_and_skips_markers(bus: SessionBus) -> None:
    kv = bus.registry_kv
    await kv.put("c1.s1", b"1")
    await kv.put("c1.s2", b"2")
    await kv.put("c1.s2.close", b"flag")
    await kv.put("c2.s1", b"other")
    await kv.put("c1.s3", b"3")
    await kv.delete("c1.s3")
    entries = await kv.list("c1.*")
    assert sorted((e.key, e.value) for e in entries) == [("c1.s1", b"1"), ("c1.s2", b"2")]
    assert await kv.list("nothing.*") == []


async def test_list_past_the_multi_last_limit_falls_back(bus: SessionBus) -> None:
    kv = bus.registry_kv
    await asyncio.gather(*(kv.put(f"big.s{i}", b"x") for i in range(1100)))
    await kv.put("small.s", b"y")
    assert len(await kv.list("big.*")) == 1100
    assert [e.key for e in await kv.list("small.*")] == ["small.s"]


async def _two_consumer_bucket(bus: SessionBus, name: str) -> Bucket:
    """A bucket whose stream allows 2 consumers: whatever leaves one behind fails by the third."""
    await bus.js.add_stream(api.StreamConfig(
        name=f"KV_{name}", subjects=[f"$KV.{name}.>"], max_msgs_per_subject=1,
        allow_direct=True, allow_rollup_hdrs=True, max_consumers=2,
    ))
    return Bucket(nc=bus.nc, js=bus.js, name=name)


async def test_big_listings_leave_no_consumer_behind(bus: SessionBus) -> None:
    name = "leaky"
    kv = await _two_consumer_bucket(bus, name)
    await asyncio.gather(*(kv.put(f"call.s{i}", str(i).encode()) for i in range(1500)))
    await kv.delete("call.s7")
    for _ in range(5):
        entries = await kv.list("call.*")
        assert len(entries) == 1499
        assert {e.key for e in entries} == {f"call.s{i}" for i in range(1500)} - {"call.s7"}
    info = await bus.js.stream_info(f"KV_{name}")
    assert info.state.consumer_count == 0
    assert await kv.list("none.*") == []


async def test_ended_watches_leave_no_consumer_behind(bus: SessionBus) -> None:
    name = "watched"
    kv = await _two_consumer_bucket(bus, name)

    async def watch(seen: asyncio.Queue[KVEvent], ready: asyncio.Event) -> None:
        async for event in kv.watch("k.*", include_existing=True, ready=ready):
            seen.put_nowait(event)

    for i in range(6):
        seen: asyncio.Queue[KVEvent] = asyncio.Queue()
        ready = asyncio.Event()
        task = asyncio.create_task(watch(seen, ready))
        await asyncio.wait_for(ready.wait(), 5)
        await kv.put(f"k.{i}", b"v")
        assert (await asyncio.wait_for(seen.get(), 5)).key in {f"k.{j}" for j in range(i + 1)}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        info = await bus.js.stream_info(f"KV_{name}")
        assert info.state.consumer_count == 0


async def test_a_watch_ends_at_once_when_its_server_is_gone(
    nats_server_factory: ServerFactory, bus_factory: BusFactory,
) -> None:
    server = nats_server_factory(name="doomed")
    sb = await bus_factory(server.url)
    ready = asyncio.Event()

    async def watch() -> None:
        async for _ in sb.registry_kv.watch("k.*", ready=ready):
            pass

    task = asyncio.create_task(watch())
    await asyncio.wait_for(ready.wait(), 5)
    server.kill()
    await _until(lambda: _disconnected(sb), within=5)
    started = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Nobody can delete the consumer now: ending must not wait for an answer.
    assert time.monotonic() - started < 1.0


async def _disconnected(sb: SessionBus) -> bool:
    return not sb.nc.is_connected


async def test_bare_kv_subject_gets_no_responders_through_a_leaf(nats_leaf: LeafTopology,
                                                                  bus_factory: BusFactory) -> None:
    # The fact Bucket.subject() is built on: through a leaf node, a KV write
    # to the bare $KV subject reaches no stream; the domain-prefixed one does.
    hub = await bus_factory(nats_leaf.hub.url)
    nc = await nats.connect(nats_leaf.leaf.url)
    try:
        bucket = hub.names.registry_bucket
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(f"$KV.{bucket}.k", b"v", timeout=2)
        ack = await nc.request(f"$JS.{nats_leaf.domain}.API.$KV.{bucket}.k", b"v", timeout=2)
        assert b'"domain":"hub"' in ack.data
    finally:
        await nc.close()
    entry = await hub.registry_kv.get("k")
    assert entry is not None and entry.value == b"v"


async def _exercise_bucket_through(writer: Bucket, reader: Bucket) -> None:
    """Every write path of ``writer`` lands where ``reader`` (on the hub) sees it."""
    assert writer.subject("k.1").startswith("$JS.hub.API.$KV.")
    rev = await writer.put("k.1", b"a", ttl=30)
    assert (await reader.get("k.1")).value == b"a"  # type: ignore[union-attr]
    rev = await writer.update("k.1", b"b", last=rev)
    with pytest.raises(KeyConflict):
        await writer.update("k.1", b"stale", last=rev - 1)
    await writer.create("k.2", b"c", ttl=3)
    with pytest.raises(KeyConflict):
        await writer.create("k.2", b"dup")
    assert sorted(e.key for e in await writer.list("k.*")) == ["k.1", "k.2"]
    seen: asyncio.Queue[KVEvent] = asyncio.Queue()
    ready = asyncio.Event()

    async def watch() -> None:
        async for event in writer.watch("k.*", ready=ready):
            seen.put_nowait(event)

    task = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await writer.delete("k.1", ttl=5)
        assert (await asyncio.wait_for(seen.get(), 5)).op is KVOp.DELETE
        expired = await asyncio.wait_for(seen.get(), 10)  # k.2's 3 s TTL runs out
        assert (expired.key, expired.op) == ("k.2", KVOp.EXPIRED)
    finally:
        task.cancel()
    assert await reader.get("k.1") is None
    head = await writer.head("k.1")
    assert head is not None and head.op is KVOp.DELETE


async def test_bucket_writes_through_a_leaf_without_jetstream(
    nats_leaf: LeafTopology, bus_factory: BusFactory,
) -> None:
    hub = await bus_factory(nats_leaf.hub.url)
    leaf = await bus_factory(nats_leaf.leaf.url, domain=nats_leaf.domain)
    await _exercise_bucket_through(leaf.registry_kv, hub.registry_kv)


async def test_bucket_writes_through_a_leaf_with_its_own_domain(
    nats_leaf: LeafTopology, nats_server_factory: ServerFactory, bus_factory: BusFactory,
) -> None:
    edge = nats_server_factory(
        name="edge", domain="edge",
        leaf_remotes=[f"nats-leaf://127.0.0.1:{nats_leaf.hub.leaf_listen_port}"],
    )
    nats_leaf.hub.wait_leafnodes(2)
    hub = await bus_factory(nats_leaf.hub.url)
    leaf = await bus_factory(edge.url, domain=nats_leaf.domain)
    await _exercise_bucket_through(leaf.registry_kv, hub.registry_kv)


async def test_domain_subjects_work_on_the_hub_itself(
    nats_leaf: LeafTopology, bus_factory: BusFactory,
) -> None:
    hub = await bus_factory(nats_leaf.hub.url, domain=nats_leaf.domain)
    await _exercise_bucket_through(hub.registry_kv, hub.registry_kv)


async def test_reads_retry_no_responders_until_the_bucket_timeout(bus: SessionBus) -> None:
    # No stream answers: the read retries (as through a leader election) and
    # then fails with a typed error after the bucket's timeout.
    missing = Bucket(nc=bus.nc, js=bus.js, name="absent", timeout=0.3)
    start = time.monotonic()
    with pytest.raises(ConnectionFailed):
        await missing.get("k")
    with pytest.raises(ConnectionFailed):
        await missing.list("k.*")
    assert 0.5 <= time.monotonic() - start < 3.0
