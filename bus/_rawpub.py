"""Publishing on hot paths without nats-py's per-call framing work.

``Client.publish`` checks the subject against a regular expression,
encodes a header dict line by line (a regular expression per name) and
formats the command on every call. A worker publishes twice per turn
(the ack and its completion record) with subjects the bus built itself
and the same header every time, so :func:`publish` takes a header block
encoded once (:func:`header_block`) and writes the ``PUB``/``HPUB``
command into nats-py's pending buffer, as ``Client.publish`` does, with
its connection-state checks and its flusher kick.
:func:`publish_nowait` does the same without a coroutine (nats-py's
``publish`` awaits two or three per call): it returns the flush to await
only when nats-py would wait there, its pending buffer past its limit or
its flusher not running.

Subjects and replies are still checked for what would break the
protocol framing (empty, or holding whitespace), since a delivery's reply
subject can come from another client.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Mapping
from typing import Any

from nats import errors
from nats.aio.client import Client

__all__ = ["header_block", "publish", "publish_nowait"]

_CRLF = b"\r\n"
_blank = re.compile(r"\s").search


def header_block(headers: Mapping[str, str]) -> bytes:
    """Encode ``headers`` once as a NATS header block (names and values already plain)."""
    lines = [b"NATS/1.0"]
    for name, value in headers.items():
        if not name or any(c in name for c in " \t\r\n:") or any(c in value for c in "\r\n"):
            raise ValueError(f"header {name!r}: {value!r} cannot be sent")
        lines.append(f"{name}: {value}".encode())
    return _CRLF.join(lines) + _CRLF + _CRLF


def publish_nowait(nc: Client, subject: str, payload: bytes, *, reply: str = "",
                   headers: bytes | None = None) -> Coroutine[Any, Any, None] | None:
    """Queue a publish like ``nc.publish`` without awaiting; what to await, if anything.

    The command goes into nats-py's pending buffer and the flusher is
    kicked, all without a coroutine. Returns None then, or, when the
    buffer is past nats-py's limit or its flusher is not running, the
    flush ``nc.publish`` would await there: await it (or close it). Raises
    what :func:`publish` raises.
    """
    if not subject or _blank(subject) is not None or (reply and _blank(reply) is not None):
        raise errors.BadSubjectError
    if nc.is_closed:
        raise errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise errors.ConnectionDrainingError
    size = len(payload)
    if not nc.is_connected and (nc._max_pending_size <= 0
                                or size + nc._pending_data_size > nc._max_pending_size):
        raise errors.OutboundBufferLimitError
    if size > nc._max_payload:
        raise errors.MaxPayloadError
    if headers is None:
        cmd = b"".join((f"PUB {subject} {reply} {size}\r\n".encode(), payload, _CRLF))
    else:
        cmd = b"".join((f"HPUB {subject} {reply} {len(headers)} {len(headers) + size}\r\n"
                        .encode(), headers, payload, _CRLF))
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += size
    # What Client._send_command does, then its flusher kick (Client._flush_pending).
    nc._pending.append(cmd)
    nc._pending_data_size += len(cmd)
    if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
        return nc._flush_pending(force_flush=True)
    queue = nc._flush_queue
    if queue is None or not queue.empty() or not nc.is_connected:
        return None  # a kick is queued already, or the buffer waits for a reconnect
    flusher = nc._flusher_task
    if flusher is None or flusher.done():
        return nc._flush_pending()  # nats-py writes inline then
    queue.put_nowait(asyncio.get_running_loop().create_future())
    return None


async def publish(nc: Client, subject: str, payload: bytes, *, reply: str = "",
                  headers: bytes | None = None) -> None:
    """Publish like ``nc.publish``, with a header block from :func:`header_block`.

    Raises what ``Client.publish`` raises for a subject or reply that is
    empty or holds whitespace, a closed or draining connection, a full
    reconnect buffer or an oversized payload.
    """
    flush = publish_nowait(nc, subject, payload, reply=reply, headers=headers)
    if flush is not None:
        await flush
