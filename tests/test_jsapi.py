"""sessionbus.bus._jsapi against a real nats-server: pinned pulls, acks, multi_last Direct Get."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from sessionbus.bus import _jsapi as jsapi
from sessionbus.bus._replies import Replies
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import ConfigError
from waiting import sigstop

Connect = Callable[[], Awaitable[Client]]


@pytest.fixture
async def connect(nats_server: NatsServer) -> AsyncIterator[Connect]:
    """Open client connections to the test server; all closed at teardown."""
    opened: list[Client] = []

    async def make() -> Client:
        nc = await nats.connect(nats_server.url)
        opened.append(nc)
        return nc

    yield make
    for nc in opened:
        await nc.close()


def _prefix(domain: str | None) -> str:
    return f"$JS.{domain}.API" if domain else jsapi.DEFAULT_API_PREFIX


async def _stream_with_consumer(
    nc: Client, *, ack_wait: float = 1.0, domain: str | None = None
) -> None:
    await nc.jetstream(domain=domain).add_stream(name="S", subjects=["s.>"])
    await jsapi.create_pinned_consumer(
        nc,
        stream="S",
        name="C",
        filter_subject="s.>",
        group="g",
        ack_wait=ack_wait,
        priority_timeout=2.0,
        max_ack_pending=100,
        api_prefix=_prefix(domain),
    )


async def _fetch_until(
    puller: jsapi.PinnedPuller, want: Callable[[list[Msg]], bool], limit: float = 4.0
) -> list[Msg]:
    """Fetch repeatedly until ``want(all fetched so far)`` holds, failing after ``limit`` s."""
    got: list[Msg] = []
    async with asyncio.timeout(limit):
        while not want(got):
            got += await puller.fetch(10, 0.3)
    return got


async def test_ack_wait_must_be_shorter_than_priority_timeout() -> None:
    with pytest.raises(ValueError, match=r"ack_wait \(2\.0s\).*priority_timeout \(2\.0s\)"):
        await jsapi.create_pinned_consumer(
            None,  # type: ignore[arg-type]  # raises before any I/O
            stream="S",
            name="C",
            filter_subject="s.>",
            group="g",
            ack_wait=2.0,
            priority_timeout=2.0,
            max_ack_pending=10,
        )


async def test_create_is_idempotent_and_updates(connect: Connect) -> None:
    nc = await connect()
    await _stream_with_consumer(nc)
    again = await jsapi.create_pinned_consumer(
        nc,
        stream="S",
        name="C",
        filter_subject="s.>",
        group="g",
        ack_wait=1.5,
        priority_timeout=2.0,
        max_ack_pending=100,
    )
    assert again["config"]["ack_wait"] == 1_500_000_000
    assert again["config"]["priority_policy"] == "pinned_client"
    with pytest.raises(jsapi.ConsumerNotFoundError):
        await jsapi.consumer_info(nc, stream="S", consumer="nope")


async def test_only_the_pinned_puller_gets_messages(connect: Connect) -> None:
    nc, nc_a, nc_b = await connect(), await connect(), await connect()
    await _stream_with_consumer(nc)
    js = nc.jetstream()
    a = jsapi.PinnedPuller(nc_a, stream="S", consumer="C", group="g")
    # B reads only the pin id of each delivery's headers.
    b = jsapi.PinnedPuller(nc_b, stream="S", consumer="C", group="g", headers=False)
    await a.start()
    await b.start()
    for i in range(5):
        await js.publish(f"s.{i}", str(i).encode())

    first = await a.fetch(5, 1.0)
    assert [m.data for m in first] == [b"0", b"1", b"2", b"3", b"4"]
    assert a.pinned and a.pin_id == first[0].headers[jsapi.PIN_ID_HEADER]  # type: ignore[index]
    info = await jsapi.consumer_info(nc, stream="S", consumer="C")
    assert info["priority_groups"][0]["pinned_client_id"] == a.pin_id
    for m in first:
        await m.ack()

    # B waits out its pull (408) while A, pulling concurrently, gets everything.
    for i in range(5, 10):
        await js.publish(f"s.{i}", str(i).encode())
    got_b, got_a = await asyncio.gather(b.fetch(10, 0.5), a.fetch(5, 1.0))
    assert got_b == [] and not b.pinned
    assert b.last_status is not None and b.last_status.code == 408
    assert [m.data for m in got_a] == [b"5", b"6", b"7", b"8", b"9"]
    for m in got_a:
        await m.ack()

    # Unpinning hands the group to the waiting puller; the old holder gets 423.
    await js.publish("s.10", b"10")
    await jsapi.unpin(nc, stream="S", consumer="C", group="g")
    got_b = await _fetch_until(b, lambda got: len(got) >= 1)
    assert [m.data for m in got_b] == [b"10"] and b.pinned and b.pin_id != a.pin_id
    assert got_b[0].headers is None
    info = await jsapi.consumer_info(nc, stream="S", consumer="C")
    assert info["priority_groups"][0]["pinned_client_id"] == b.pin_id
    assert await a.fetch(1, 0.5) == []
    assert a.last_status is not None and a.last_status.code == 423 and not a.pinned
    await b.stop()
    await a.stop()


async def test_a_pin_id_stored_with_a_message_does_not_pass_for_the_servers(
    connect: Connect,
) -> None:
    """A publisher can store a ``Nats-Pin-Id`` header; the server adds the real one after it."""
    nc, nc_a = await connect(), await connect()
    await _stream_with_consumer(nc)
    js = nc.jetstream()
    await js.publish("s.1", b"forged", headers={jsapi.PIN_ID_HEADER: "BOGUS", "X": "y"})
    await js.publish("s.2", b"next")
    for headers in (True, False):
        puller = jsapi.PinnedPuller(nc_a, stream="S", consumer="C", group="g", headers=headers)
        await puller.start()
        got = await puller.fetch(1, 1.0)
        assert [m.data for m in got] == [b"forged"]
        info = await jsapi.consumer_info(nc, stream="S", consumer="C")
        assert puller.pin_id == info["priority_groups"][0]["pinned_client_id"] != "BOGUS"
        # Still pinned: the next pull is served, not refused with 423.
        got += await puller.fetch(1, 1.0)
        assert [m.data for m in got] == [b"forged", b"next"] and puller.pinned
        for m in got:
            await m.nak()
        await puller.stop()
        await jsapi.unpin(nc, stream="S", consumer="C", group="g")


async def test_a_fetch_the_server_never_answers_ends_on_the_clients_clock(
    nats_server: NatsServer, connect: Connect
) -> None:
    nc, nc_a = await connect(), await connect()
    await _stream_with_consumer(nc)
    puller = jsapi.PinnedPuller(nc_a, stream="S", consumer="C", group="g")
    await puller.start()
    assert nats_server.pid is not None
    loop = asyncio.get_running_loop()
    await sigstop(nats_server.pid)
    try:
        began = loop.time()
        async with asyncio.timeout(5):
            assert await puller.fetch(5, 0.3) == []
        took = loop.time() - began
        # The server's 408 never came: the client gave up on its own.
        assert puller.last_status is None
        assert 0.3 + jsapi._FETCH_GRACE <= took < 3.0, took
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    await nc.jetstream().publish("s.1", b"1")
    got = await _fetch_until(puller, lambda got: len(got) >= 1)
    assert [m.data for m in got] == [b"1"]
    await puller.stop()


async def test_expires_must_be_shorter_than_priority_timeout(connect: Connect) -> None:
    nc = await connect()
    await _stream_with_consumer(nc)
    puller = jsapi.PinnedPuller(nc, stream="S", consumer="C", group="g")
    await puller.start()
    assert puller.priority_timeout == 2.0
    with pytest.raises(ConfigError):
        await puller.fetch(1, 2.0)
    await puller.stop()
    with pytest.raises(jsapi.ConsumerNotFoundError):
        await jsapi.PinnedPuller(nc, stream="S", consumer="nope", group="g").start()


async def test_ack_in_progress_nak_term(connect: Connect) -> None:
    nc = await connect()
    await _stream_with_consumer(nc, ack_wait=0.8)
    js = nc.jetstream()
    puller = jsapi.PinnedPuller(nc, stream="S", consumer="C", group="g")
    await puller.start()
    for i in range(4):
        await js.publish(f"s.{i}", f"m{i}".encode())
    acked, naked, termed, held = await puller.fetch(4, 1.0)
    meta = held.metadata
    assert (meta.stream, meta.consumer) == ("S", "C")
    assert (meta.sequence.stream, meta.num_delivered) == (4, 1)

    await acked.ack()
    await termed.term()
    await naked.nak(delay=0.2)
    # Keep `held` alive with in_progress across several ack_waits while the
    # nak'd message comes back; `held` itself must never be redelivered.
    loop = asyncio.get_running_loop()
    start = loop.time()
    redelivered: list[Msg] = []
    async with asyncio.timeout(4.0):
        while not redelivered or loop.time() - start < 1.8:
            await held.in_progress()
            for m in await puller.fetch(10, 0.2):
                redelivered.append(m)
                await m.ack()
    assert [(m.data, m.metadata.num_delivered) for m in redelivered] == [(b"m1", 2)]
    await held.ack()

    assert await puller.fetch(10, 1.0) == []  # nothing else returns after ack_wait
    info = await jsapi.consumer_info(nc, stream="S", consumer="C")
    assert info["num_ack_pending"] == 0 and info["ack_floor"]["stream_seq"] == 4
    await puller.stop()


async def test_multi_last_wildcards_paging_and_empty(connect: Connect) -> None:
    nc = await connect()
    kv = await nc.jetstream().create_key_value(bucket="reg", history=1, direct=True)
    for call in ("c0", "c1"):
        for s in range(5):
            await kv.put(f"{call}.s{s}", f"{call}{s}".encode())
    await kv.put("c0.s0", b"c0-new")
    await kv.delete("c0.s1")

    def view(res: list[jsapi.LastMsg]) -> list[tuple[str, bytes, int, str | None]]:
        return [(m.subject, m.data, m.seq, m.headers.get("KV-Operation")) for m in res]

    full = await jsapi.direct_get_last_for_subjects(nc, stream="KV_reg", subjects=["$KV.reg.c0.*"])
    assert view(full) == [
        ("$KV.reg.c0.s2", b"c02", 3, None),
        ("$KV.reg.c0.s3", b"c03", 4, None),
        ("$KV.reg.c0.s4", b"c04", 5, None),
        ("$KV.reg.c0.s0", b"c0-new", 11, None),
        ("$KV.reg.c0.s1", b"", 12, "DEL"),
    ]
    paged = await jsapi.direct_get_last_for_subjects(
        nc, stream="KV_reg", subjects=["$KV.reg.c0.*"], batch=2
    )
    assert paged == full
    both = await jsapi.direct_get_last_for_subjects(
        nc, stream="KV_reg", subjects=["$KV.reg.c0.s2", "$KV.reg.c1.>"], batch=4
    )
    assert [m.subject for m in both] == ["$KV.reg.c0.s2"] + [f"$KV.reg.c1.s{s}" for s in range(5)]
    none = await jsapi.direct_get_last_for_subjects(
        nc, stream="KV_reg", subjects=["$KV.reg.nope.*"]
    )
    assert none == []
    # On a caller's inbox, the same answers; a call's own inbox is gone after it.
    shared = Replies(nc)
    subscribed = len(nc._subs)
    for _ in range(3):
        assert await jsapi.direct_get_last_for_subjects(
            nc, stream="KV_reg", subjects=["$KV.reg.c0.*"], batch=2, replies=shared) == full
        assert await jsapi.direct_get_last_for_subjects(
            nc, stream="KV_reg", subjects=["$KV.reg.c0.*"]) == full
    assert len(nc._subs) == subscribed + 1  # the shared inbox only
    await shared.close()
    assert len(nc._subs) == subscribed


async def test_multi_last_limits(connect: Connect) -> None:
    nc = await connect()
    js = nc.jetstream()
    kv = await js.create_key_value(bucket="big", history=1, direct=True)
    await asyncio.gather(*(kv.put(f"k.{i}", b"x") for i in range(1025)))
    with pytest.raises(jsapi.TooManyResultsError):
        await jsapi.direct_get_last_for_subjects(
            nc, stream="KV_big", subjects=["$KV.big.k.*"], batch=100
        )
    await js.add_stream(name="PLAIN", subjects=["plain.>"])  # no allow_direct
    with pytest.raises(jsapi.JetStreamAPIError) as err:
        await jsapi.direct_get_last_for_subjects(nc, stream="PLAIN", subjects=["plain.*"])
    assert err.value.code == 503


async def test_domain_prefix(nats_server_factory: Callable[..., NatsServer]) -> None:
    server = nats_server_factory(name="hub", domain="hub")
    nc = await nats.connect(server.url)
    try:
        prefix = _prefix("hub")
        await _stream_with_consumer(nc, domain="hub")
        await nc.publish("s.x", b"hi")
        puller = jsapi.PinnedPuller(nc, stream="S", consumer="C", group="g", api_prefix=prefix)
        await puller.start()
        (msg,) = await puller.fetch(1, 1.0)
        await msg.ack_sync()
        assert puller.pinned
        await jsapi.unpin(nc, stream="S", consumer="C", group="g", api_prefix=prefix)
        info = await jsapi.consumer_info(nc, stream="S", consumer="C", api_prefix=prefix)
        assert info["num_ack_pending"] == 0 and "pinned_client_id" not in info["priority_groups"][0]
        kv = await nc.jetstream(domain="hub").create_key_value(bucket="r", direct=True)
        await kv.put("a.b", b"1")
        last = await jsapi.direct_get_last_for_subjects(
            nc, stream="KV_r", subjects=["$KV.r.a.*"], api_prefix=prefix
        )
        assert [(m.subject, m.data) for m in last] == [("$KV.r.a.b", b"1")]
    finally:
        await nc.close()
