"""The last message of every subject matching a filter, however many.

Direct Get ``multi_last`` stops at 1,024 subjects. :func:`last_per_subject`
reads any number: a one-shot pull consumer with ``deliver_policy:
last_per_subject`` (a raw ``$JS.API`` request: nats-py 2.16 has no such
listing), drained with ``no_wait`` pulls and deleted when done, whether the
read succeeded or not. Its replies land on one subscription per read: a
listing of thousands of keys costs no task or timeout per message.

(A session's messages in a range of sequences are read by
``bus/_seqread.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any, NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from sessionbus.bus._jsapi import (
    API_TIMEOUT,
    DEFAULT_API_PREFIX,
    JetStreamAPIError,
    ack_numbers,
    status_of,
)
from sessionbus.bus.errors import BusError, BusTimeout

__all__ = ["StoredMsg", "last_per_subject"]

_NS = 1_000_000_000
#: Messages asked for per request.
PAGE = 2048
#: Seconds a one-shot listing consumer outlives a client that vanished mid-read.
_SCAN_INACTIVE = 30.0


class StoredMsg(NamedTuple):
    """One stored message: subject, payload, headers and stream sequence."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int


class _Collector:
    """Collects the replies to one request on a callback subscription."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self.done = asyncio.Event()
        self.status: tuple[int, Msg] | None = None
        self.want = 0

    async def on_msg(self, msg: Msg) -> None:
        status = status_of(msg)
        if status is not None:
            if status.code == 100:  # idle heartbeat: not an answer
                return
            self.status = (status.code, msg)
            self.done.set()
            return
        self.msgs.append(msg)
        if self.want and len(self.msgs) >= self.want:
            self.done.set()

    def reset(self, want: int = 0) -> None:
        self.msgs = []
        self.status = None
        self.want = want
        self.done.clear()

    async def wait(self, what: str) -> None:
        try:
            async with asyncio.timeout(API_TIMEOUT):
                await self.done.wait()
        except TimeoutError as e:
            raise BusTimeout(f"no reply from {what} within {API_TIMEOUT}s") from e


def _seq_and_pending(reply: str) -> tuple[int, int]:
    numbers = ack_numbers(reply)
    if numbers is None:
        raise BusError(f"a delivery with an unknown ack subject {reply[:120]!r}")
    return numbers.stream_seq, numbers.pending


async def _api(nc: Client, subject: str, body: dict[str, Any] | None) -> Any:
    payload = json.dumps(body).encode() if body is not None else b""
    try:
        reply = await nc.request(subject, payload, timeout=API_TIMEOUT)
    except TimeoutError as e:
        raise BusTimeout(f"no reply from {subject} within {API_TIMEOUT}s") from e
    resp = json.loads(reply.data)
    err = resp.get("error")
    if err:
        raise JetStreamAPIError(int(err.get("code", 0)), int(err.get("err_code", 0)),
                                err.get("description", ""))
    return resp


async def last_per_subject(
    nc: Client,
    *,
    stream: str,
    subject_filter: str,
    api_prefix: str = DEFAULT_API_PREFIX,
) -> list[StoredMsg]:
    """The last message of every subject matching ``subject_filter``, in stream order.

    Markers (deletes, purges, expiries) are included; the caller filters.
    The consumer is deleted before returning or raising; were the client
    to vanish mid-read, the server drops it ``_SCAN_INACTIVE`` s later.
    """
    name = f"scan_{uuid.uuid4().hex}"
    config = {
        "name": name, "deliver_policy": "last_per_subject", "ack_policy": "none",
        "filter_subject": subject_filter, "mem_storage": True, "num_replicas": 1,
        "inactive_threshold": int(_SCAN_INACTIVE * _NS), "max_waiting": 1,
    }
    info = await _api(nc, f"{api_prefix}.CONSUMER.CREATE.{stream}.{name}",
                      {"stream_name": stream, "config": config, "action": "create"})
    try:
        pending = int(info.get("num_pending", 0))
        out: list[StoredMsg] = []
        if pending == 0:
            return out
        col = _Collector()
        sub = await nc.subscribe(nc.new_inbox(), cb=col.on_msg)
        next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{name}"
        try:
            while True:
                want = min(PAGE * 4, pending)
                col.reset(want)
                body = json.dumps({"batch": want, "no_wait": True}).encode()
                await nc.publish(next_subject, body, reply=sub.subject)
                await col.wait(next_subject)
                left = pending
                for msg in col.msgs:
                    sseq, left = _seq_and_pending(msg.reply)
                    out.append(StoredMsg(msg.subject, msg.data, msg.headers or {}, sseq))
                if col.status is not None and not col.msgs:
                    code = col.status[0]
                    if code in (404, 408):  # drained
                        return out
                    raise JetStreamAPIError(code, 0, next_subject)
                if left == 0:
                    return out
                pending = left
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
    finally:
        with contextlib.suppress(NatsError, TimeoutError, JetStreamAPIError, BusTimeout):
            await _api(nc, f"{api_prefix}.CONSUMER.DELETE.{stream}.{name}", None)
