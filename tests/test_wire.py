"""The bus's protocol reader hands over exactly what nats-py's own parser would."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.errors import ProtocolError
from nats.protocol import parser as nats_parser
from sessionbus.bus import SessionBus
from sessionbus.bus._rawsub import subscribe_raw, unsubscribe_raw
from sessionbus.bus._server import NatsServer
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus._wire import install, installed, routes

Event = tuple[Any, ...]


def _client(events: list[Event], *, fast: bool) -> Client:
    """A client (never connected) whose parser reports what it dispatches into ``events``."""
    nc = Client()

    async def on_msg(sid: int, subject: bytes, reply: bytes, data: bytes,
                     headers: bytes | None) -> None:
        events.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def on_ping() -> None:
        events.append(("ping",))

    async def on_pong() -> None:
        events.append(("pong",))

    async def on_info(info: dict[str, Any], initial_connection: bool = False) -> None:
        events.append(("info", info))

    async def on_err(message: str) -> None:
        events.append(("err", message))

    nc._process_msg = on_msg  # type: ignore[method-assign,assignment]
    nc._process_ping = on_ping  # type: ignore[method-assign]
    nc._process_pong = on_pong  # type: ignore[method-assign]
    nc._process_info = on_info  # type: ignore[method-assign]
    nc._process_err = on_err  # type: ignore[method-assign]
    if fast:
        install(nc)
    return nc


def _traffic(rng: random.Random, count: int) -> tuple[bytes, int]:
    """Protocol from a server: every kind of operation, odd sizes, bodies that look like lines.

    Also returns how many operations are dispatched (all but ``+OK``).
    """
    out = bytearray()
    silent = 0
    for i in range(count):
        kind = rng.randrange(9)
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 17, 300])))
        if rng.random() < 0.2:
            body = b"MSG a 1 2\r\nPING\r\n" + body  # a body is never read as a command
        reply = rng.choice([b"", b"_INBOX.x.y", b"$JS.ACK.s.c.1.2.3.4.5"])
        if kind < 3:
            args = b" ".join(a for a in (b"sub.%d" % i, b"%d" % (i % 7 + 1), reply) if a)
            out += b"MSG %s %d\r\n%s\r\n" % (args, len(body), body)
        elif kind < 6:
            headers = b"NATS/1.0\r\nNats-Sequence: %d\r\n\r\n" % i
            if kind == 5:
                headers, body = b"NATS/1.0 408 Request Timeout\r\n\r\n", b""
            args = b" ".join(a for a in (b"hsub.%d" % i, b"%d" % (i % 5 + 1), reply) if a)
            out += b"HMSG %s %d %d\r\n%s%s\r\n" % (args, len(headers), len(headers) + len(body),
                                                   headers, body)
        elif kind == 6:
            op = rng.choice([b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'Some Error'\r\n"])
            silent += op == b"+OK\r\n"
            out += op
        elif kind == 7:
            out += b"INFO " + json.dumps({"server_id": f"s{i}", "max_payload": 1024}).encode() \
                + b"\r\n"
        elif rng.random() < 0.5:
            # Whitespace nats-py's expressions accept besides one space.
            out += b"MSG  tab.%d\t3  %d\r\n%s\r\n" % (i, len(body), body)
        else:
            # ... right after the operation too (bodies with protocol lines in them).
            headers = b"NATS/1.0\r\nN: %d\r\n\r\n" % i
            body = b"MSG b 2 0\r\n\r\n" + body
            out += (b"MSG\ttab.%d 4 %d\r\n%s\r\n" % (i, len(body), body)
                    + b"HMSG\ttab.%d 4 %d %d\r\n%s%s\r\n" % (
                        i, len(headers), len(headers) + len(body), headers, body))
            silent -= 1  # two operations dispatched for this one
    return bytes(out), count - silent


async def _feed(nc: Client, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in [*cuts, len(data)]:
        await nc._ps.parse(data[last:cut])
        last = cut


@pytest.mark.parametrize("seed", range(6))
async def test_split_anywhere_the_stream_dispatches_as_nats_py_does(seed: int) -> None:
    rng = random.Random(seed)
    data, dispatched = _traffic(rng, 300)
    expected: list[Event] = []
    await _feed(_client(expected, fast=False), data, [])
    assert len(expected) == dispatched
    # Reads that end anywhere: in a command line, in a header block, in a body, in "\r\n".
    for chunking in ([], sorted(rng.sample(range(1, len(data)), 400)), list(range(1, 400)),
                     list(range(7, len(data), 61))):
        got: list[Event] = []
        fast = _client(got, fast=True)
        await _feed(fast, data, chunking)
        assert got == expected
        assert not fast._ps.buf
        assert fast._ps.state == nats_parser.AWAITING_CONTROL_LINE


@pytest.mark.parametrize("line", [
    b"MSG a b 3\r\nabc\r\n",             # a sid that is no number
    b"MSG a 1 r extra 3\r\nabc\r\n",     # too many arguments
    b"HMSG a 1 x 3\r\nabc\r\n",          # a header size that is no number
    b"MSG a\r\n",                        # too few
    b"MSG a 1 +3\r\nabc\r\n",            # a size that is not all digits
    b"HMSG a 1 0_3 5\r\nabcde\r\n",
    b"BOGUS op\r\n",                     # no operation at all
])
async def test_a_line_nats_py_refuses_is_refused(line: bytes) -> None:
    for fast in (False, True):
        events: list[Event] = []
        with pytest.raises(ProtocolError):
            await _client(events, fast=fast)._ps.parse(line)
        assert events == []


async def test_a_header_block_longer_than_its_message_is_refused() -> None:
    # nats-py reads this (headers that run past the message); the bus refuses it.
    events: list[Event] = []
    nc = _client(events, fast=True)
    with pytest.raises(ProtocolError):
        await nc._ps.parse(b"HMSG a 1 r 12 3\r\nNATS/1.0\r\n\r\n\r\nMSG b 1 1\r\nx\r\n")
    assert events == []


@pytest.mark.parametrize("fast", [False, True], ids=["nats-py", "bus"])
async def test_a_payload_read_in_many_pieces_arrives_whole_with_what_follows(fast: bool) -> None:
    events: list[Event] = []
    nc = _client(events, fast=fast)
    body = bytes(range(256)) * 4_000  # about 1 MB
    headers = b"NATS/1.0\r\nA: 1\r\n\r\n"
    data = (b"HMSG big 1 r %d %d\r\n%s%s\r\nMSG next 2 1\r\nz\r\n"
            % (len(headers), len(headers) + len(body), headers, body))
    await _feed(nc, data, list(range(1_000, len(data), 4_096)))
    assert events == [("msg", 1, b"big", b"r", body, headers), ("msg", 2, b"next", b"", b"z", None)]
    assert not nc._ps.buf


async def test_a_routed_delivery_skips_nats_py_and_a_failing_handler_stops_nothing() -> None:
    events: list[Event] = []
    nc = _client(events, fast=True)
    routed: list[Event] = []
    errors: list[BaseException] = []

    def deliver(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if data == b"boom":
            raise ValueError("handler bug")
        routed.append((subject, reply, data, headers))

    async def on_error(e: BaseException) -> None:
        errors.append(e)

    nc._error_cb = on_error
    routes(nc)[2] = deliver
    await nc._ps.parse(b"MSG a 2 4\r\nboom\r\nHMSG b 2 r 12 14\r\nNATS/1.0\r\n\r\nok\r\n"
                       b"MSG c 3 1\r\nz\r\n")
    assert routed == [(b"b", b"r", b"ok", b"NATS/1.0\r\n\r\n")]
    assert [type(e) for e in errors] == [ValueError]
    assert events == [("msg", 3, b"c", b"", b"z", None)]
    assert nc.stats["in_msgs"] == 2  # the two routed ones; nats-py counts its own


@pytest.mark.parametrize("fast", [False, True], ids=["nats-py", "bus"])
@pytest.mark.parametrize("cut", [0, 11, 12], ids=["one-read", "line-then-payload",
                                                  "payload-split"])
async def test_a_reset_during_a_delivery_drops_the_rest_as_nats_py_does(
    fast: bool, cut: int,
) -> None:
    events: list[Event] = []
    nc = _client(events, fast=fast)

    async def resetting(*args: Any) -> None:
        events.append(args[:2])
        nc._ps.reset()  # what a reconnect does

    nc._process_msg = resetting  # type: ignore[method-assign]
    # The first message's payload may come in a later read than its line.
    await _feed(nc, b"MSG a 1 3\r\nxyz\r\nMSG b 1 1\r\ny\r\n", [cut] if cut else [])
    assert events == [(1, b"a")]
    assert not nc._ps.buf
    await nc._ps.parse(b"MSG c 1 1\r\nz\r\n")  # the next connection's first delivery
    assert events == [(1, b"a"), (1, b"c")]


@pytest.mark.parametrize("fast", [False, True], ids=["nats-py", "bus"])
async def test_a_reset_by_an_error_line_drops_the_rest_as_nats_py_does(fast: bool) -> None:
    events: list[Event] = []
    nc = _client(events, fast=fast)

    async def stale(message: str) -> None:
        events.append(("err", message))
        nc._ps.reset()  # what a stale connection error leads to: a reconnect

    nc._process_err = stale  # type: ignore[method-assign]
    await nc._ps.parse(b"MSG a 1 1\r\nx\r\n-ERR 'Stale Connection'\r\nMSG b 1 1\r\ny\r\n")
    assert events == [("msg", 1, b"a", b"", b"x", None), ("err", "'stale connection'")]
    assert not nc._ps.buf
    await nc._ps.parse(b"PING\r\nMSG c 1 1\r\nz\r\n")  # the next connection
    assert events[2:] == [("ping",), ("msg", 1, b"c", b"", b"z", None)]


async def test_an_unknown_line_past_the_size_limit_is_refused() -> None:
    events: list[Event] = []
    with pytest.raises(ProtocolError):
        await _client(events, fast=True)._ps.parse(b"X" * 5_000 + b"\r\nPING\r\n")
    assert events == []


async def test_the_bus_reads_with_it_and_every_payload_arrives_whole(
    nats_server: NatsServer,
) -> None:
    rng = random.Random(7)
    sizes = [rng.choice([0, 1, 100, 4_000, 70_000, 500_000]) for _ in range(200)]
    async with SessionBus(nats_server.url) as sb:
        assert installed(sb.nc)
        publisher = await nats.connect(nats_server.url)
        routed: list[tuple[bytes, bytes]] = []
        done = asyncio.Event()

        def deliver(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            routed.append((subject, data))
            if len(routed) == len(sizes):
                done.set()

        raw = await subscribe_raw(sb.nc, "wire.raw.*", deliver)
        plain = await sb.nc.subscribe("wire.plain.*")
        await server_holds_subscriptions(sb.nc, 5)
        try:
            bodies = [rng.randbytes(size) for size in sizes]
            for i, body in enumerate(bodies):
                await publisher.publish(f"wire.raw.{i}", body)
                await publisher.publish(f"wire.plain.{i}", body, headers={"N": str(i)})
            await publisher.flush()
            await asyncio.wait_for(done.wait(), 30)
            assert routed == [(f"wire.raw.{i}".encode(), b) for i, b in enumerate(bodies)]
            for i, body in enumerate(bodies):
                msg = await plain.next_msg(timeout=10)
                assert (msg.subject, msg.data, msg.headers) == (f"wire.plain.{i}", body,
                                                                {"N": str(i)})
        finally:
            await unsubscribe_raw(sb.nc, raw)
            await publisher.close()
