"""Requests on one inbox: what a write's acknowledgement can say, and shared starts."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import nats.js.errors
import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._replies import Replies, Reply, acked_sequence
from sessionbus.bus.errors import BusError, ConnectionFailed, PermissionDenied


def test_an_acknowledgement_names_the_sequence() -> None:
    assert acked_sequence(Reply(b'{"stream":"s","seq":42}', None), "w") == 42
    assert acked_sequence(Reply(b'{"stream":"s","seq":7,"duplicate":true}', None), "w") == 7


def test_a_refusal_raises_the_servers_error() -> None:
    refusal = b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds"}}'
    with pytest.raises(nats.js.errors.BadRequestError) as caught:
        acked_sequence(Reply(refusal, None), "w")
    assert caught.value.err_code == 10054 and "size" in str(caught.value.description)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"stream":"s"}', b'{"seq":"4"}',
                                  b'{"seq":true}', b'"text"'])
def test_anything_else_is_a_bus_error_naming_the_write(body: bytes) -> None:
    with pytest.raises(BusError, match=r"^w: not an acknowledgement") as caught:
        acked_sequence(Reply(body, None), "w")
    assert not isinstance(caught.value, ConnectionFailed)


def test_a_status_without_a_body_is_a_lost_connection() -> None:
    with pytest.raises(ConnectionFailed, match="no JetStream answering"):
        acked_sequence(Reply(b"", b"NATS/1.0 408 Request Timeout\r\n\r\n"), "w")


async def test_a_request_cancelled_while_the_inbox_starts_cancels_no_other(
    bus: SessionBus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = await bus.open("starting", participant="u")
    await s.send("stored")
    replies = Replies(bus.nc)
    subscribing = asyncio.Event()
    release = asyncio.Event()
    subscribe = bus.nc.subscribe

    async def held_subscribe(*args: Any, **kwargs: Any) -> Any:
        subscribing.set()
        await release.wait()  # as when nats-py's pending buffer is full
        return await subscribe(*args, **kwargs)

    monkeypatch.setattr(bus.nc, "subscribe", held_subscribe)
    direct = f"{bus.api_prefix}.DIRECT.GET.{bus.names.envelope_stream}"
    request = json.dumps({"last_by_subj": bus.names.stored("starting", bus.partitions)}).encode()
    first = asyncio.create_task(replies.send(direct, request, None))
    await subscribing.wait()
    second = asyncio.create_task(replies.send(direct, request, None))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    reply = await replies.wait(await second, within=5, what="a get")
    assert b"stored" in reply.data
    await replies.close()


async def test_a_refused_request_that_is_discarded_leaves_no_unread_failure(
    bus: SessionBus, caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused, then given up by its caller (a write whose companion publish failed)."""
    pending = await bus.replies.send("refused.here", b"", None)
    bus.replies.refuse("refused.here")
    assert isinstance(pending.future.exception(), PermissionDenied)
    fresh = await bus.replies.send("refused.too", b"", None)
    bus.replies.refuse("refused.too")
    bus.replies.discard(fresh)
    del fresh
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
