"""A core subscription is held by the server before anyone relies on it."""

from __future__ import annotations

from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from sessionbus.bus._server import NatsServer
from sessionbus.bus._subscriptions import server_holds_subscriptions


class _Recorder:
    """Forwards to nats-py's transport and keeps every chunk written, in order."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        self._transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        chunks = list(chunks)
        self.written.extend(bytes(c) for c in chunks)
        self._transport.writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _record(nc: Client) -> _Recorder:
    recorder = _Recorder(nc._transport)
    nc._transport = recorder  # type: ignore[assignment]
    return recorder


async def _ignore(msg: Msg) -> None:
    del msg


async def test_a_ping_follows_every_sub_before_it_returns(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        recorder = _record(nc)
        for subject in ("a.b", "c.>"):
            recorder.written.clear()
            await nc.subscribe(subject, cb=_ignore)
            await server_holds_subscriptions(nc, 5.0)
            wire = b"".join(recorder.written)
            sub_at = wire.find(f"SUB {subject} ".encode())
            assert sub_at >= 0, wire
            # The server answers in order: a PONG to a PING written after the
            # SUB proves it holds the subscription.
            assert wire.find(b"PING\r\n", sub_at) > sub_at, wire
    finally:
        await nc.close()


async def test_another_connection_is_heard_right_after(nats_server: NatsServer) -> None:
    listener = await nats.connect(nats_server.url)
    talker = await nats.connect(nats_server.url)
    try:
        for i in range(50):
            sub = await listener.subscribe(f"heard.{i}", max_msgs=1)
            await server_holds_subscriptions(listener, 5.0)
            await talker.publish(f"heard.{i}", b"x")
            msg = await sub.next_msg(timeout=5)
            assert msg.data == b"x"
    finally:
        await listener.close()
        await talker.close()
