"""Bulk reads of a stream without a long-lived consumer.

Two shapes, both raw ``$JS.API`` requests (nats-py 2.16 has neither):

* :func:`direct_get_range`: a Direct Get *batch* (``next_by_subj`` from a
  sequence, ``batch`` messages per request): the messages of one subject
  filter in stream order, paged, answered by any replica, no consumer at
  all. Used to read a session's history from a sequence on.
* :func:`last_per_subject`: the last message of every subject matching a
  filter, however many (Direct Get ``multi_last`` stops at 1,024
  subjects): a one-shot pull consumer with ``deliver_policy:
  last_per_subject``, drained with ``no_wait`` pulls and deleted when
  done, whether the read succeeded or not.

Replies land on one subscription per read: a batch of thousands of
messages costs no task or timeout per message.
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
    read_page,
    status_of,
)
from sessionbus.bus.errors import BusError, BusTimeout

__all__ = ["StoredMsg", "direct_get_range", "last_per_subject"]

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


async def direct_get_range(
    nc: Client,
    *,
    stream: str,
    subject_filter: str,
    after: int = 0,
    up_to: int | None = None,
    api_prefix: str = DEFAULT_API_PREFIX,
) -> list[StoredMsg]:
    """Messages on ``subject_filter`` with ``after < seq <= up_to`` (no bound if None).

    In stream order, ``PAGE`` per Direct Get batch request; the stream needs
    ``allow_direct``. Raises JetStreamAPIError on an error status (503 when
    no replica answers) and BusTimeout when nothing answers in time.
    """
    subject = f"{api_prefix}.DIRECT.GET.{stream}"
    out: list[StoredMsg] = []
    sub = await nc.subscribe(nc.new_inbox())
    try:
        seq = after + 1
        while up_to is None or seq <= up_to:
            batch = PAGE if up_to is None else max(1, min(PAGE, up_to - seq + 1))
            req = {"seq": seq, "next_by_subj": subject_filter, "batch": batch}
            await nc.publish(subject, json.dumps(req).encode(), reply=sub.subject)
            msgs, code, eob = await read_page(sub, subject)
            for msg in msgs:
                headers = msg.headers or {}
                msg_seq = int(headers["Nats-Sequence"])
                if up_to is not None and msg_seq > up_to:
                    return out
                out.append(StoredMsg(headers["Nats-Subject"], msg.data, headers, msg_seq))
            if code == 404:  # nothing (more) on the filter
                return out
            if code != 204:
                raise JetStreamAPIError(code, 0, (eob.headers or {}).get("Description", subject))
            eob_headers = eob.headers or {}
            if int(eob_headers.get("Nats-Num-Pending", "0")) == 0:
                return out
            seq = int(eob_headers["Nats-Last-Sequence"]) + 1
        return out
    finally:
        with contextlib.suppress(NatsError):
            await sub.unsubscribe()


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
