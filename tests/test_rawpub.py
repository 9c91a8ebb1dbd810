"""Hot-path publishing and raw subscriptions carry exactly what nats-py's own would."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats import errors
from sessionbus.bus._rawpub import header_block, publish, publish_nowait
from sessionbus.bus._rawsub import subscribe_raw, unsubscribe_raw
from sessionbus.bus._server import NatsServer
from sessionbus.bus._subscriptions import server_holds_subscriptions


async def test_a_raw_publish_arrives_as_a_nats_py_publish_would(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("raw.>")
        block = header_block({"Nats-TTL": "60s", "X-Name": "a value"})
        await publish(nc, "raw.one", b"body", reply="back.here", headers=block)
        await publish(nc, "raw.two", b"")
        one = await sub.next_msg(timeout=5)
        two = await sub.next_msg(timeout=5)
        assert (one.subject, one.reply, one.data) == ("raw.one", "back.here", b"body")
        assert one.headers == {"Nats-TTL": "60s", "X-Name": "a value"}
        assert (two.subject, two.reply, two.data, two.headers) == ("raw.two", "", b"", None)
    finally:
        await nc.close()


async def test_a_publish_queued_without_a_coroutine_is_written_by_the_flusher(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("q.>")
        await nc.flush()
        assert publish_nowait(nc, "q.one", b"1") is None
        assert publish_nowait(nc, "q.two", b"2", reply="r") is None  # a kick already queued
        one, two = await sub.next_msg(timeout=5), await sub.next_msg(timeout=5)
        assert [(m.subject, m.reply, m.data) for m in (one, two)] == [
            ("q.one", "", b"1"), ("q.two", "r", b"2")]
        # Past nats-py's pending limit the flush nc.publish would await comes back.
        nc._max_pending_size = 10
        flush = publish_nowait(nc, "q.three", b"3" * 20)
        assert flush is not None
        await flush
        assert nc._pending_data_size == 0  # written out before it returned
        assert (await sub.next_msg(timeout=5)).data == b"3" * 20
        with pytest.raises(errors.BadSubjectError):
            publish_nowait(nc, "a b", b"x")
    finally:
        await nc.close()
    with pytest.raises(errors.ConnectionClosedError):
        publish_nowait(nc, "late", b"x")


@pytest.mark.parametrize(("subject", "reply"), [
    ("", ""), ("a b", ""), ("a\r\nPUB x 1", ""), ("ok", "bad reply"), ("ok", "r\n"),
])
async def test_subjects_that_would_break_the_framing_are_refused(
    nats_server: NatsServer, subject: str, reply: str
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(errors.BadSubjectError):
            await publish(nc, subject, b"x", reply=reply)
        # The connection is still usable: nothing reached the server.
        sub = await nc.subscribe("after")
        await publish(nc, "after", b"fine")
        assert (await sub.next_msg(timeout=5)).data == b"fine"
    finally:
        await nc.close()


def test_headers_that_would_break_the_framing_are_refused() -> None:
    for bad in ({"A B": "x"}, {"A:B": "x"}, {"": "x"}, {"A": "x\r\nB: y"}):
        with pytest.raises(ValueError):
            header_block(bad)


async def test_a_closed_connection_or_an_oversized_payload_raise(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    with pytest.raises(errors.MaxPayloadError):
        await publish(nc, "big", b"x" * (nc.max_payload + 1))
    await nc.close()
    with pytest.raises(errors.ConnectionClosedError):
        await publish(nc, "late", b"x")


async def test_a_raw_subscription_hands_over_bytes_and_ends(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    got: list[tuple[bytes, bytes, bytes, bytes | None]] = []
    arrived = asyncio.Event()

    def deliver(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        got.append((subject, reply, data, headers))
        arrived.set()

    try:
        sub = await subscribe_raw(nc, "in.*", deliver)
        other = await nc.subscribe("in.*")  # nats-py's own path, beside it
        await nc.publish("in.a", b"1", reply="r", headers={"K": "v"})
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [(b"in.a", b"r", b"1", b"NATS/1.0\r\nK: v\r\n\r\n")]
        assert (await other.next_msg(timeout=5)).headers == {"K": "v"}
        await unsubscribe_raw(nc, sub)
        await nc.publish("in.b", b"2")
        assert (await other.next_msg(timeout=5)).data == b"2"
        assert len(got) == 1
    finally:
        await nc.close()


async def test_a_raising_raw_handler_leaves_the_connection_reading(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    other = await nats.connect(nats_server.url)
    try:
        def broken(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            raise ValueError("a handler's bug")

        raw = await subscribe_raw(nc, "broken", broken)
        plain = await nc.subscribe("plain")
        await server_holds_subscriptions(nc, 5)
        await other.publish("broken", b"x")
        await other.publish("plain", b"y")
        await other.flush()
        # Without the guard nats-py's read loop ends: nothing more arrives on
        # any subscription while the client still says it is connected.
        assert (await plain.next_msg(timeout=5)).data == b"y"
        assert nc._reading_task is not None and not nc._reading_task.done()
        await unsubscribe_raw(nc, raw)
    finally:
        await nc.close()
        await other.close()
