"""Reading the messages of one subject filter in a range of stream sequences, fast.

What a session's history read needs: every message on the session's
filter with ``after < seq <= up_to``, in stream order, as ``(seq, body)``.
Two server paths, both into one :class:`~sessionbus.bus._rawsub.RawInbox`
(no nats-py ``Msg`` per delivery, no header dict):

* a Direct Get batch (``next_by_subj`` from a sequence): one request, no
  consumer, answered by any replica. The first page is small; most reads
  (a short session, the gap in front of a worker's cached history) end
  there, in one round trip.
* when the first page's end-of-batch status says more than
  ``CONSUMER_PAST`` messages are still to come (and the range to
  ``up_to`` is longer than that), an ephemeral push
  consumer (no acks, flow controlled, in memory) delivers the rest from the
  next sequence on: on nats-server 2.15 a consumer delivers about twice as
  fast as Direct Get batches. It is created without a name (what a
  client's permissions allow on the envelope stream) and the server drops
  it ``_LINGER`` seconds after the read unsubscribes. Should the server
  refuse it (the stream's consumer limit, a leader election), the read
  goes on with Direct Get pages. So it does, from the last message
  received, when the consumer's deliveries may have lost some: their
  delivery sequence skips (what the server wrote to a connection that
  died is gone; nats-py subscribes again on the new one and the consumer
  goes on past it), or the consumer is silent after a reconnect. A read
  never returns a range with a hole.

Both end at ``up_to`` (what is stored after it is dropped unread), or,
with no bound, at what was stored when the read got there.

A long read is bound by the client's CPU (decoding above all), not by
these round trips. Two ways of starting the consumer sooner measured no
faster on 1,000-3,000 envelopes: asking for it at the first page's first
message (each carries ``Nats-Num-Pending``) while the page still arrives
(its reply queues behind the page on the same connection), and a first
page of 1, 8 or 32 messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from nats.aio.client import Client
from sessionbus.bus._jsapi import (
    API_TIMEOUT,
    DEFAULT_API_PREFIX,
    JetStreamAPIError,
    ack_numbers,
    direct_answer,
    stored_at,
)
from sessionbus.bus._rawsub import RawInbox, header_value, status_line
from sessionbus.bus._replies import Replies
from sessionbus.bus.errors import BusError, BusTimeout, ConnectionFailed, nats_errors

__all__ = ["BEHIND_FOR", "CONSUMER_PAST", "HEADERS_ONLY_PAGE_BYTES", "UntrustedDeliveries",
           "newest_start", "read_errors", "read_range"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NS = 1_000_000_000
#: Messages asked for by the first Direct Get page.
FIRST_PAGE = 128
#: Messages per later Direct Get page.
PAGE = 2048
#: Messages still to come, past the first page, above which a consumer delivers them.
CONSUMER_PAST = 256
#: Bytes after which a Direct Get page of a headers-only read stops (it carries bodies).
HEADERS_ONLY_PAGE_BYTES = 64 * 1024
#: Seconds the server keeps a history consumer after its reader unsubscribed.
_LINGER = 2.0
#: Seconds without a delivery after which a history read checks its connection.
_SILENT = 0.5
#: Flow control and idle heartbeat interval asked of a history consumer (seconds).
_HEARTBEAT = 5.0
#: Seconds a read that ends short of its ``must_reach`` reads on before BusTimeout.
BEHIND_FOR = 5.0
#: First and longest pause (seconds) before reading on past a replica that was behind.
_BEHIND_PAUSE = 0.005
_BEHIND_PAUSE_MAX = 0.2

_SEQ = b"\r\nNats-Sequence:"
_PENDING = b"\r\nNats-Num-Pending:"
_LAST = b"\r\nNats-Last-Sequence:"


@contextlib.contextmanager
def read_errors(what: str) -> Iterator[None]:
    """The bus's errors for a read here, named ``what``: no replica answering is ConnectionFailed.

    nats-py's errors as :func:`~sessionbus.bus.errors.nats_errors` makes
    them, and a 503 (no replica of the stream answers) ConnectionFailed;
    other API errors pass as they are.
    """
    with nats_errors(what):
        try:
            yield
        except JetStreamAPIError as e:
            if e.code == 503:
                raise ConnectionFailed(f"{what}: {e}") from e
            raise


#: Probes a search for the newest messages makes at most (every other one halves
#: the range): past it, the search starts where it got to, which is earlier.
_MAX_PROBES = 130


async def newest_start(replies: Replies, *, stream: str, subject: str, count: int,
                       up_to: int | None = None, api_prefix: str = DEFAULT_API_PREFIX) -> int:
    """A sequence from which on ``subject`` holds at least its newest ``count`` messages.

    So a read of what is stored after the returned sequence has them all
    (and whatever was stored meanwhile); 0 when the subject holds ``count``
    or fewer. With ``up_to``, the newest ``count`` stored at or before it
    (those after it are counted first, and added to ``count``: what is
    stored after it during the search can make the start later than it
    should be, so a reader checks that it got ``count``). Found without
    reading the messages before them: a one-message
    Direct Get batch at a sequence answers with the first message from it
    and how many follow it (``Nats-Num-Pending``), so a search by
    interpolation, every other step a halving, takes a few round trips
    however long the subject is. A replica that is behind counts fewer
    messages at the end: the start is then earlier, never later.
    """
    what = f"the newest {count} on {subject}"
    direct = f"{api_prefix}.DIRECT.GET.{stream}"

    async def probe(seq: int) -> tuple[int, int] | None:
        """The first message at or after ``seq``, and how many there are from it on."""
        request = json.dumps({"seq": seq, "next_by_subj": subject, "batch": 1}).encode()
        msgs, code, headers = await replies.batch(direct, request, within=API_TIMEOUT, what=what)
        if not msgs:
            if code == 404:
                return None
            raise JetStreamAPIError(code, 0, _description(headers or b"") or what)
        block = msgs[0].headers or b""
        found, pending = header_value(block, _SEQ), header_value(block, _PENDING)
        if not (found and pending and found.isdigit() and pending.isdigit()):
            raise BusError(f"{what}: a Direct Get answer without its sequence or count")
        return int(found), int(pending) + 1

    first = await probe(1)
    if first is None or first[1] <= count:
        return 0
    beyond = 0  # stored after up_to when counted
    if up_to is not None:
        past = await probe(up_to + 1)
        beyond = 0 if past is None else past[1]
        count += beyond
        if first[1] <= count:
            return 0
    last = await _last_of(replies, direct, subject, what)
    if last is None or last <= first[0]:  # gone meanwhile: read it all
        return 0
    # Invariants: lo is a message with lo_count >= count from it on; fewer
    # than count are stored from hi on. With up_to, the search stays at or
    # before it (what is stored after it meanwhile would push it past).
    lo, lo_count = first
    if up_to is not None and up_to < last:
        hi, hi_count = up_to + 1, beyond
    elif count == 1:  # the last message is the newest one
        return last - 1
    else:
        hi, hi_count = last, 1
    for step in range(_MAX_PROBES):
        if lo_count == count or hi - lo <= 1:
            break
        if step % 2:
            x = (lo + hi) // 2
        else:
            x = lo + (hi - lo) * (lo_count - count) // (lo_count - hi_count)
        x = min(max(x, lo + 1), hi - 1)
        got = await probe(x)
        if got is not None and got[1] >= count and got[0] < hi:
            lo, lo_count = got
        else:  # (counts that grew meanwhile past hi are kept below count)
            hi, hi_count = x, min(count - 1, 0 if got is None else got[1])
    return lo - 1


async def _last_of(replies: Replies, direct: str, subject: str, what: str) -> int | None:
    """The sequence of the last message on ``subject``, None if it holds none."""
    pending = await replies.send(direct, json.dumps({"last_by_subj": subject}).encode(), None)
    fields = direct_answer(await replies.wait(pending, within=API_TIMEOUT, what=what), what)
    if fields is None:
        return None
    found = fields.get("Nats-Sequence", "")
    if not found.isdigit():
        raise BusError(f"{what}: a Direct Get answer without its sequence")
    return int(found)


class UntrustedDeliveries(BusError):
    """A history consumer's deliveries cannot be taken as they come: read the rest otherwise.

    A delivery skipped some (a reconnect lost what was written to the dead
    connection), or its ack subject has a shape this code does not know.
    """


def _description(headers: bytes) -> str:
    status = status_line(headers)
    return status[1] if status is not None else ""


class _Range(Generic[T]):
    """What one read collected: ``(seq, converted)`` in stream order, up to ``up_to``."""

    __slots__ = ("ack_head", "convert", "done", "expected", "got", "next_delivery", "out",
                 "past", "up_to")

    def __init__(self, convert: Callable[[int, bytes, bytes | None], T],
                 up_to: int | None) -> None:
        self.convert = convert
        self.up_to = up_to
        self.out: list[tuple[int, T]] = []
        self.done = False
        self.past = False
        """Whether a message past ``up_to`` was seen: the replica holds all up to it."""
        self.got = 0
        self.expected: int | None = None
        self.next_delivery = 1
        self.ack_head = b""
        """``$JS.ACK.<stream>.<consumer>.<delivered>`` of the consumer's first delivery."""

    def next_seq(self, seq: int) -> int:
        """Where to read on from: past ``seq`` and past everything collected."""
        return max(seq, self.out[-1][0] + 1) if self.out else seq

    def on_direct(self, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """One Direct Get reply: its sequence is in a header."""
        found = header_value(headers or b"", _SEQ)
        if found is None or self.done:
            return self.done  # not a stored message: nothing the server sends here
        seq = int(found)
        if self.up_to is not None and seq > self.up_to:
            self.done = self.past = True
            return True
        self.out.append((seq, self.convert(seq, data, headers)))
        return False

    def _numbers(self, reply: bytes) -> tuple[int, int, int]:
        """Stream sequence, delivery sequence and pending count of a consumer delivery.

        Notes the start of the first one's ack subject, which all of the
        consumer's deliveries share (see :meth:`on_pushed`).
        """
        numbers = ack_numbers(reply)
        if numbers is None:
            shown = reply[:120].decode("utf-8", "replace")
            raise UntrustedDeliveries(
                f"a history consumer's delivery has an unknown ack subject {shown!r}")
        if not self.ack_head:
            tokens = reply.split(b".")
            if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<4 more>
                self.ack_head = b".".join(tokens[:5])
        return numbers.stream_seq, numbers.consumer_seq, numbers.pending

    def on_pushed(self, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """One consumer delivery: its sequences and what is pending are in the reply subject.

        The consumer numbers its deliveries 1, 2, 3...: a step other than +1
        means some were lost (written to a connection that died before the
        client read them; nats-py subscribes again on the new one and the
        consumer goes on), so the read cannot go on from here.
        """
        if self.done:
            return True
        # Past the first delivery, only the four numbers after the start
        # its ack subject shares with the first are split off and read.
        head = self.ack_head
        parts = reply.rsplit(b".", 4)
        if head and len(parts) == 5 and parts[0] == head:
            try:
                seq, delivery, pending = int(parts[1]), int(parts[2]), int(parts[4])
            except ValueError:
                seq, delivery, pending = self._numbers(reply)  # refuses what is not a number
        else:
            seq, delivery, pending = self._numbers(reply)
        if delivery != self.next_delivery:
            raise UntrustedDeliveries(
                f"a history consumer's deliveries went from {self.next_delivery - 1} to "
                f"{delivery}: some were lost (a reconnect?)")
        self.next_delivery = delivery + 1
        if self.up_to is not None and seq > self.up_to:
            self.done = self.past = True
            return True
        self.out.append((seq, self.convert(seq, data, headers)))
        self.got += 1
        if pending == 0 or (self.expected is not None and self.got >= self.expected):
            self.done = True
        return self.done


async def read_range(
    nc: Client,
    convert: Callable[[int, bytes, bytes | None], T],
    *,
    stream: str,
    subject_filter: str,
    after: int = 0,
    up_to: int | None = None,
    must_reach: int | None = None,
    headers_only: bool = False,
    api_prefix: str = DEFAULT_API_PREFIX,
) -> list[tuple[int, T]]:
    """``(seq, convert(seq, body, headers))`` per message on the filter, ``after < seq <= up_to``.

    In stream order; ``up_to=None`` reads to the end. ``convert`` runs as
    each message arrives (decoding overlaps the transfer); it must not
    block, and what it raises ends the read. ``headers`` is the header
    block as the server sent it, if any: the stored message's headers,
    followed by the server's own (``Nats-Sequence``, ...) on a Direct Get
    reply. The stream needs ``allow_direct``.

    ``must_reach`` is a sequence the caller knows holds a message on the
    filter (a turn's own envelope); one at or before ``after`` is no bound.
    Any replica answers a Direct Get, and a follower may not have applied
    the newest messages yet: a read that ends short of ``must_reach`` reads
    on from where it stopped, a little later, for up to ``BEHIND_FOR``
    seconds. Then it asks the stream's
    leader: if the message is gone (expired, deleted), the read is what it
    is; if not, BusTimeout.

    ``headers_only``: for a reader of headers alone. Direct Get pages are
    cut at ``HEADERS_ONLY_PAGE_BYTES`` (Direct Get sends bodies), and all
    that is left after the first goes through a consumer that delivers
    headers only: ``body`` is then empty (the header block has
    ``Nats-Msg-Size``), as it can be for any message should the consumer
    be refused (Direct Get pages, with their bodies, read the rest).

    Raises JetStreamAPIError on an error status (503 when no replica
    answers) and BusTimeout when nothing answers in time.
    """
    if must_reach is not None and must_reach <= after:
        must_reach = None  # nothing this read covers can be it
    found = _Range(convert, up_to)
    seq = after + 1
    consumer_ok = True
    behind_since: float | None = None
    pause = _BEHIND_PAUSE
    while True:
        async with await RawInbox.open(nc) as inbox:
            start = await _direct_pages(nc, inbox, found, stream=stream,
                                        subject_filter=subject_filter, seq=seq,
                                        api_prefix=api_prefix, hand_over=consumer_ok,
                                        headers_only=headers_only)
            if start is not None:
                try:
                    await _consume(nc, inbox, found, stream=stream,
                                   subject_filter=subject_filter, start=start,
                                   api_prefix=api_prefix, headers_only=headers_only)
                except (JetStreamAPIError, BusTimeout, UntrustedDeliveries) as e:
                    if isinstance(e, UntrustedDeliveries):
                        logger.warning("%s; reading on with Direct Get", e)
                    # Read on with Direct Get (a fresh inbox) from where it stopped.
                    consumer_ok = False
                    found.done = False
                    seq = found.next_seq(start)
                    continue
        if must_reach is None or found.past or (found.out and found.out[-1][0] >= must_reach):
            return found.out
        # The replica that answered is behind: read on from its end, later.
        now = asyncio.get_running_loop().time()
        if behind_since is None:
            behind_since = now
        elif now - behind_since >= BEHIND_FOR:
            if not await stored_at(nc, stream, must_reach, api_prefix=api_prefix):
                return found.out  # gone meanwhile (expired, deleted): nothing to wait for
            got = found.out[-1][0] if found.out else after
            raise BusTimeout(f"reading {subject_filter!r}: no replica of {stream!r} answered "
                             f"past sequence {got} within {BEHIND_FOR}s, though {must_reach} "
                             f"is stored")
        await asyncio.sleep(pause)
        pause = min(pause * 2, _BEHIND_PAUSE_MAX)
        found.done = False
        seq = found.next_seq(seq)


async def _direct_pages(
    nc: Client, inbox: RawInbox, found: _Range[T], *, stream: str, subject_filter: str,
    seq: int, api_prefix: str, hand_over: bool, headers_only: bool = False,
) -> int | None:
    """Collect Direct Get pages from ``seq``; the sequence to hand over from, or None if done.

    With ``hand_over``, stops after the first page when more than
    ``CONSUMER_PAST`` messages are still to come (with ``headers_only``,
    any), returning where the rest starts. With ``headers_only`` each page
    stops at ``HEADERS_ONLY_PAGE_BYTES``.
    """
    subject = f"{api_prefix}.DIRECT.GET.{stream}"
    up_to = found.up_to
    inbox.on_msg = found.on_direct
    page = FIRST_PAGE if hand_over else PAGE
    while up_to is None or seq <= up_to:
        batch = page if up_to is None else max(1, min(page, up_to - seq + 1))
        page = PAGE
        req: dict[str, object] = {"seq": seq, "next_by_subj": subject_filter, "batch": batch}
        if headers_only:
            req["max_bytes"] = HEADERS_ONLY_PAGE_BYTES
        await nc.publish(subject, json.dumps(req).encode(), reply=inbox.subject)
        status = await inbox.wait(subject, idle=API_TIMEOUT)
        if found.done:
            return None
        assert status is not None  # the handler said nothing: a status ended the wait
        code, eob = status
        if code == 404:  # nothing (more) on the filter
            return None
        if code != 204:
            raise JetStreamAPIError(code, 0, _description(eob) or subject)
        pending = int(header_value(eob, _PENDING) or b"0")
        if pending == 0:
            return None
        seq = int(header_value(eob, _LAST) or b"0") + 1
        # ``pending`` counts to the end of the stream: with a bound, no more
        # than ``up_to - seq + 1`` of them are in the range.
        left = pending if up_to is None else min(pending, up_to - seq + 1)
        if hand_over and left > (0 if headers_only else CONSUMER_PAST):
            return seq
    return None


async def _consume(
    nc: Client, inbox: RawInbox, found: _Range[T], *, stream: str, subject_filter: str,
    start: int, api_prefix: str, headers_only: bool = False,
) -> None:
    """Collect what an ephemeral push consumer from ``start`` delivers, to the end."""
    config: dict[str, object] = {
        "deliver_policy": "by_start_sequence", "opt_start_seq": start,
        "ack_policy": "none", "filter_subject": subject_filter,
        "deliver_subject": inbox.subject, "flow_control": True,
        "idle_heartbeat": int(_HEARTBEAT * _NS), "mem_storage": True, "num_replicas": 1,
        "inactive_threshold": int(_LINGER * _NS),
    }
    if headers_only:
        config["headers_only"] = True
    create = f"{api_prefix}.CONSUMER.CREATE.{stream}"
    body = json.dumps({"stream_name": stream, "config": config}).encode()
    found.next_delivery = 1
    reconnects = nc.stats["reconnects"]
    inbox.on_msg = found.on_pushed
    try:
        reply = await nc.request(create, body, timeout=API_TIMEOUT)
    except Exception as e:  # no responders, timeout: no consumer to read from
        raise JetStreamAPIError(503, 0, f"{create}: {e!r}") from e
    info = json.loads(reply.data)
    err = info.get("error")
    if err:
        raise JetStreamAPIError(int(err.get("code", 0)), int(err.get("err_code", 0)),
                                err.get("description", ""))
    found.expected = int(info.get("num_pending", 0))
    if found.got >= found.expected:
        found.done = True
    silent = 0.0
    while not found.done:
        got = found.got
        try:
            status = await inbox.wait(create, idle=_SILENT)
        except BusTimeout:
            # Silent: if the connection was lost meanwhile, what the consumer
            # wrote to the old one (perhaps all the rest) will never come.
            if nc.stats["reconnects"] != reconnects or not nc.is_connected:
                raise UntrustedDeliveries("the connection was lost while a history consumer "
                                          "delivered") from None
            silent = _SILENT if found.got != got else silent + _SILENT
            if silent >= API_TIMEOUT:
                raise
            continue
        if status is not None and not found.done:  # the consumer went away (409 deleted, ...)
            raise JetStreamAPIError(status[0], 0, _description(status[1]) or create)
