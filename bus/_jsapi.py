"""JetStream API calls nats-py 2.16 lacks, sent as raw JSON over core NATS.

Pinned priority-group consumers (create, pull with group and pin id,
unpin) and the Direct Get ``multi_last`` batch. Every call takes
``api_prefix``: ``"$JS.API"``, or ``"$JS.<domain>.API"`` across a domain.
Shrink this module as the client catches up.

Server behaviour relied on (nats-server 2.15.1): delivered messages carry
``Nats-Pin-Id``; a pull without the pin waits (then 408) while another
client holds it, a pull with a stale id gets 423 at once; the server moves
the pin ``priority_timeout`` after the holder's last pull *request* (a
still-waiting pull does not keep it), or at once on unpin.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from sessionbus.bus._headers import parse_header_lines
from sessionbus.bus._rawsub import header_value, status_line, subscribe_raw, unsubscribe_raw
from sessionbus.bus._replies import Replies, Reply
from sessionbus.bus.errors import BusError, BusTimeout, ConfigError

DEFAULT_API_PREFIX = "$JS.API"
"""API prefix outside any domain; a domain ``hub`` uses ``$JS.hub.API``."""

PIN_ID_HEADER = "Nats-Pin-Id"
"""Header on every message a pinned consumer delivers, naming the pin."""

API_TIMEOUT = 5.0
"""Seconds to wait for each API reply; wrap a call in ``asyncio.timeout`` for less."""

_NS = 1_000_000_000
# Grace on top of a pull's server-side expiry, so the server's own 408
# normally ends a fetch rather than the client clock.
_FETCH_GRACE = 0.25
#: Where a data message's header lines start: after ``NATS/1.0\r\n``.
_HEADER_LINE_END = 10
_PIN_ID = f"\r\n{PIN_ID_HEADER}:".encode()
# err_code values for a missing consumer / stream in JSON API replies.
_NOT_FOUND_ERR_CODES = frozenset({10014, 10059})
# Per-page bookkeeping on Direct Get replies, dropped so results compare
# equal however they were paged.
_PAGE_HEADERS = frozenset({"Nats-Num-Pending", "Nats-Last-Sequence"})


class JetStreamAPIError(BusError):
    """The JetStream API answered with an error or an error status.

    ``code`` is the HTTP-like status (400, 404, 409, 413, 503...),
    ``err_code`` the server's JetStream error number (0 for a status
    message, which has none), ``description`` the server's text.
    """

    def __init__(self, code: int, err_code: int = 0, description: str = "") -> None:
        self.code = code
        self.err_code = err_code
        self.description = description
        super().__init__(f"JetStream API error {code} ({err_code}): {description}")


class ConsumerNotFoundError(JetStreamAPIError, LookupError):
    """The consumer (or its stream) does not exist."""


class TooManyResultsError(JetStreamAPIError):
    """A ``multi_last`` filter matched more subjects than the server allows (1024)."""


@dataclass(frozen=True, slots=True)
class Status:
    """A server status message: ``code`` and ``description`` (may be empty)."""

    code: int
    description: str


class LastMsg(NamedTuple):
    """The last message stored on one subject, from a Direct Get."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int


class AckNumbers(NamedTuple):
    """What a JetStream delivery's ack subject says about it."""

    delivered: int
    """How many times the message has been delivered (1: the first time)."""
    stream_seq: int
    consumer_seq: int
    """The consumer's count of deliveries, this one included (1, 2, 3...)."""
    pending: int
    """Messages the consumer still had to deliver after this one."""


def ack_numbers(reply: str | bytes) -> AckNumbers | None:
    """The numbers in a delivery's ack subject (text or raw bytes), None if ``reply`` is not one.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``,
    or with ``<domain>.<account hash>`` after ``ACK`` (and a trailing token)
    in the newer form. Read here, once per delivery, because nats-py's
    ``metadata`` also builds a datetime per message.
    """
    tokens: list[str] | list[bytes]
    if isinstance(reply, bytes):
        tokens = reply.split(b".")
        if len(tokens) < 9 or tokens[0] != b"$JS" or tokens[1] != b"ACK":
            return None
    else:
        tokens = reply.split(".")
        if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
            return None
    at = 4 if len(tokens) == 9 else 6
    try:
        # tuple.__new__: a third of the time of AckNumbers(...), once per delivery.
        return _make_numbers(AckNumbers, (int(tokens[at]), int(tokens[at + 1]),
                                          int(tokens[at + 2]), int(tokens[at + 4])))
    except (ValueError, IndexError):  # not a number, or a form too short (10 tokens)
        return None


_make_numbers: Callable[[type[AckNumbers], tuple[int, int, int, int]], AckNumbers] = (
    tuple.__new__)


def status_of(msg: Msg) -> Status | None:
    """Return the status carried by ``msg``, or None if it is a data message.

    Status messages have an empty payload and a ``Status`` header.
    """
    if msg.data or not msg.headers:
        return None
    code = msg.headers.get("Status")
    if code is None or not code.isdigit():
        return None
    # nats-py puts the next header line into Description when the status
    # line has no text (a bare "503"): keep only a real first line.
    desc = msg.headers.get("Description", "")
    if desc[:1].isspace():
        desc = ""
    return Status(int(code), desc.splitlines()[0] if desc else "")


async def _api(nc: Client, subject: str, body: dict[str, Any] | None) -> Any:
    payload = json.dumps(body).encode() if body is not None else b""
    try:
        reply = await nc.request(subject, payload, timeout=API_TIMEOUT)
    except NoRespondersError as e:
        raise JetStreamAPIError(503, 0, f"no responders on {subject} (JetStream/domain?)") from e
    except NatsTimeoutError as e:
        raise BusTimeout(f"no reply from {subject} within {API_TIMEOUT}s") from e
    resp = json.loads(reply.data)
    err = resp.get("error")
    if err:
        cls = JetStreamAPIError
        if err.get("err_code") in _NOT_FOUND_ERR_CODES:
            cls = ConsumerNotFoundError
        raise cls(int(err.get("code", 0)), int(err.get("err_code", 0)), err.get("description", ""))
    return resp


async def create_pinned_consumer(
    nc: Client,
    *,
    stream: str,
    name: str,
    filter_subject: str,
    group: str,
    ack_wait: float,
    priority_timeout: float,
    max_ack_pending: int,
    max_deliver: int = -1,
    inactive_threshold: float | None = None,
    api_prefix: str = DEFAULT_API_PREFIX,
) -> dict[str, Any]:
    """Create, or update in place, a durable pull consumer pinned per group.

    Durations are seconds. Sent without an ``action``, so the server
    creates it, returns it unchanged for an identical config, or updates
    the mutable fields (``ack_wait``, ``priority_timeout``, limits,
    filter). Returns the consumer info. Raises ConfigError (a ValueError)
    before any I/O unless ``0 < ack_wait < priority_timeout``: with a
    longer ack_wait a failover redelivers a session's messages out of order.
    """
    if not 0 < ack_wait < priority_timeout:
        raise ConfigError(
            f"ack_wait ({ack_wait}s) must be positive and shorter than "
            f"priority_timeout ({priority_timeout}s)"
        )
    config: dict[str, Any] = {
        "durable_name": name,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "filter_subject": filter_subject,
        "ack_wait": int(ack_wait * _NS),
        "max_deliver": max_deliver,
        "max_ack_pending": max_ack_pending,
        "priority_policy": "pinned_client",
        "priority_groups": [group],
        "priority_timeout": int(priority_timeout * _NS),
    }
    if inactive_threshold is not None:
        config["inactive_threshold"] = int(inactive_threshold * _NS)
    subject = f"{api_prefix}.CONSUMER.CREATE.{stream}.{name}.{filter_subject}"
    info: dict[str, Any] = await _api(nc, subject, {"stream_name": stream, "config": config})
    return info


async def consumer_info(
    nc: Client,
    *,
    stream: str,
    consumer: str,
    api_prefix: str = DEFAULT_API_PREFIX,
) -> dict[str, Any]:
    """Return the consumer's info; raise ConsumerNotFoundError if it or its stream is absent.

    For a pinned consumer, ``info["priority_groups"]`` lists each group
    with ``pinned_client_id`` (absent while nobody holds the pin).
    """
    subject = f"{api_prefix}.CONSUMER.INFO.{stream}.{consumer}"
    info: dict[str, Any] = await _api(nc, subject, None)
    return info


async def stored_at(nc: Client, stream: str, seq: int, *,
                    api_prefix: str = DEFAULT_API_PREFIX) -> bool:
    """Whether the stream's leader holds a message at ``seq`` (a message get, not Direct Get).

    No answer, or another error, counts as held: the caller goes on as if
    the message were there.
    """
    try:
        await _api(nc, f"{api_prefix}.STREAM.MSG.GET.{stream}", {"seq": seq})
    except JetStreamAPIError as e:
        return e.code != 404
    except Exception:  # no answer (a timeout, a closed connection): held, as said
        return True
    return True


def direct_answer(reply: Reply, what: str) -> dict[str, str] | None:
    """The header fields of one Direct Get answer; None when the server found nothing (404).

    Any other status raises JetStreamAPIError. The server's own headers
    (``Nats-Sequence``, ``Nats-Subject``...) follow the stored ones, and the
    last line of a name counts: a stored message cannot pass for another.
    """
    if not reply.data:
        status = status_line(reply.headers)
        if status is not None:
            if status[0] == 404:
                return None
            raise JetStreamAPIError(status[0], 0, status[1] or what)
    block = reply.headers
    return parse_header_lines(block[_HEADER_LINE_END:]) if block else {}


async def unpin(
    nc: Client,
    *,
    stream: str,
    consumer: str,
    group: str,
    api_prefix: str = DEFAULT_API_PREFIX,
) -> None:
    """Drop the group's pin so the next waiting puller is pinned at once.

    Succeeds when nobody holds the pin; raises JetStreamAPIError (400) for
    an unknown group. The old holder's next pull gets status 423.
    """
    subject = f"{api_prefix}.CONSUMER.UNPIN.{stream}.{consumer}"
    await _api(nc, subject, {"group": group})


class PinnedPuller:
    """Pulls from a pinned priority-group consumer on one long-lived inbox.

    Each ``fetch`` sends one pull request, replying to ``<inbox>.<n>`` under
    a single wildcard subscription: data messages from an earlier,
    client-abandoned pull still arrive and are returned by the next fetch
    (they are ours to ack), while a stale pull's status is told apart by
    its subject and ignored. Returned messages are ordinary nats-py ``Msg``
    objects, so ``ack``, ``in_progress``, ``nak``, ``term`` and
    ``metadata`` work on them. One fetch at a time: deliveries wait in one
    queue for whichever fetch runs. With ``headers=False`` their ``headers``
    stay None (the pin id is still read): for a caller that needs only
    bodies and reply subjects, which saves parsing every delivery's block.
    """

    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        consumer: str,
        group: str,
        api_prefix: str = DEFAULT_API_PREFIX,
        headers: bool = True,
    ) -> None:
        self._nc = nc
        self._parse_headers = headers
        self._stream = stream
        self._consumer = consumer
        self._group = group
        self._api_prefix = api_prefix
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._received: deque[tuple[bytes, bytes, bytes, bytes | None]] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._time_up = False
        self._seq = 0
        self.pin_id: str | None = None
        """The pin id the server last gave this puller, None when not pinned."""
        self.last_status: Status | None = None
        """The status that ended the latest fetch, None if it ended on batch or clock."""
        self.priority_timeout: float | None = None
        """The consumer's priority_timeout in seconds, read by ``start``."""

    @property
    def pinned(self) -> bool:
        """True while this puller believes it holds the pin (it learns of loss on its next pull)."""
        return self.pin_id is not None

    async def start(self) -> None:
        """Check the consumer exists, then subscribe the reply inbox; call before ``fetch``.

        Raises ConsumerNotFoundError if the consumer or its stream is absent.
        """
        if self._sub is not None:
            return
        info = await consumer_info(
            self._nc, stream=self._stream, consumer=self._consumer, api_prefix=self._api_prefix
        )
        pt = info["config"].get("priority_timeout")
        self.priority_timeout = pt / _NS if pt else None
        self._inbox = self._nc.new_inbox()
        # Deliveries come in as bytes (see bus._rawsub): no Msg built,
        # header block parsed and queue hop in nats-py for a status or a
        # delivery fetch() looks at once; data messages become Msgs here.
        self._received.clear()
        self._sub = await subscribe_raw(self._nc, f"{self._inbox}.*", self._deliver)

    def _end_wait(self) -> None:
        self._time_up = True
        self._notify()

    def _deliver(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self._received.append((subject, reply, data, headers))
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def stop(self) -> None:
        """Unsubscribe. Messages delivered but not fetched come back after ack_wait."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await unsubscribe_raw(self._nc, sub)
        self._received.clear()
        self.pin_id = None

    async def fetch(self, batch: int, expires: float) -> list[Msg]:
        """Send one pull for up to ``batch`` messages, expiring after ``expires`` seconds.

        Returns the data messages received, which may be fewer (or none)
        when the pull expires (408), finds nothing (404), loses the pin
        (423, which clears ``pin_id``) or is ended by the server (409); the
        status is kept in ``last_status``. Raises ConsumerNotFoundError when
        the consumer is gone, JetStreamAPIError on a bad request (unless
        messages were collected: the next fetch raises), and ConfigError
        unless ``expires`` < priority_timeout: the server unpins a holder
        whose last pull *request* is that old, even while it still waits.
        Half of priority_timeout leaves room to work between pulls.
        """
        if self._sub is None:
            raise RuntimeError("PinnedPuller.fetch() before start()")
        if batch < 1 or expires <= 0:
            raise ConfigError(f"batch ({batch}) and expires ({expires}) must be positive")
        if self.priority_timeout is not None and expires >= self.priority_timeout:
            raise ConfigError(
                f"pull expires ({expires}s) must be shorter than priority_timeout "
                f"({self.priority_timeout}s), or the pin is lost while waiting"
            )
        self._seq += 1
        reply = f"{self._inbox}.{self._seq}"
        req: dict[str, Any] = {"batch": batch, "expires": int(expires * _NS), "group": self._group}
        if self.pin_id is not None:
            req["id"] = self.pin_id
        self.last_status = None
        await self._nc.publish(self._next_subject, json.dumps(req).encode(), reply=reply)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + expires + _FETCH_GRACE
        out: list[Msg] = []
        received, nc, sid = self._received, self._nc, self._sub._id
        pull_reply = reply.encode()
        # One timer per fetch (not a timeout per wait): it wakes the wait it
        # finds and marks the fetch as over.
        timer: asyncio.TimerHandle | None = None
        self._time_up = False
        try:
            while len(out) < batch:
                if not received:
                    if timer is None:
                        if loop.time() >= deadline:
                            break
                        timer = loop.call_at(deadline, self._end_wait)
                    elif self._time_up:
                        break
                    self._wake = loop.create_future()
                    try:
                        await self._wake
                    finally:
                        self._wake = None
                    continue
                subject, msg_reply, data, headers = received.popleft()
                line = None if data else status_line(headers)
                if line is None:
                    fields = None
                    if headers is not None and len(headers) > _HEADER_LINE_END:
                        if self._parse_headers:
                            fields = parse_header_lines(headers[_HEADER_LINE_END:]) or None
                        pin = header_value(headers, _PIN_ID)
                        if pin:
                            self.pin_id = pin.decode("utf-8", "replace")
                    out.append(Msg(_client=nc, subject=subject.decode(), reply=msg_reply.decode(),
                                   data=data, headers=fields, _sid=sid))
                    continue
                if subject != pull_reply:
                    continue  # the end of an earlier pull we stopped waiting for
                status = self.last_status = Status(*line)
                if status.code == 423:
                    self.pin_id = None  # pin moved: pull without an id to be pinned anew
                elif not out and (status.code in (400, 503) or "Deleted" in status.description):
                    cls = ConsumerNotFoundError if status.code != 400 else JetStreamAPIError
                    raise cls(status.code, 0, status.description or self._next_subject)
                break
        finally:
            if timer is not None:
                timer.cancel()
        return out


async def direct_get_last_for_subjects(
    nc: Client,
    *,
    stream: str,
    subjects: list[str],
    batch: int | None = None,
    api_prefix: str = DEFAULT_API_PREFIX,
    replies: Replies | None = None,
) -> list[LastMsg]:
    """Return the last message of every subject matching ``subjects`` (wildcards allowed).

    One Direct Get ``multi_last`` request per page of ``batch`` (None: the
    server picks the page size), all pages read at the sequence the first
    one saw, so the result is a consistent snapshot; ordered by stream
    sequence. The stream needs ``allow_direct``. Returns [] when nothing
    matches. KV delete/purge markers are included (``KV-Operation`` header);
    headers omit the per-page ``Nats-Num-Pending``/``Nats-Last-Sequence``.
    Raises TooManyResultsError past 1024 matching subjects, and
    JetStreamAPIError (503) when the stream is absent or lacks allow_direct.
    The answers come on ``replies``' inbox (read as bytes), or on one made
    for the call.
    """
    if not subjects:
        return []
    subject = f"{api_prefix}.DIRECT.GET.{stream}"
    req: dict[str, Any] = {"multi_last": subjects}
    if batch is not None:
        req["batch"] = batch
    out: list[LastMsg] = []
    inbox = Replies(nc) if replies is None else replies
    try:
        while True:
            msgs, code, end = await inbox.batch(subject, json.dumps(req).encode(),
                                                within=API_TIMEOUT, what=subject)
            for msg in msgs:
                fields = parse_header_lines(msg.headers[_HEADER_LINE_END:]) if msg.headers else {}
                hdrs = {k: v for k, v in fields.items() if k not in _PAGE_HEADERS}
                out.append(LastMsg(hdrs["Nats-Subject"], msg.data, hdrs,
                                   int(hdrs["Nats-Sequence"])))
            if code == 404:  # nothing matched (or nothing left)
                return out
            line = status_line(end)
            description = line[1] if line is not None else ""
            if code == 413:
                raise TooManyResultsError(413, 0, description)
            if code != 204:
                raise JetStreamAPIError(code, 0, description or subject)
            # 204 EOB ends a page; Nats-Num-Pending > 0 means more: ask from
            # the next sequence, capped where the first page was cut.
            eob = parse_header_lines(end or b"")
            if int(eob.get("Nats-Num-Pending", "0")) == 0:
                return out
            req["seq"] = int(eob["Nats-Last-Sequence"]) + 1
            req["up_to_seq"] = int(eob["Nats-UpTo-Sequence"])
    finally:
        if replies is None:
            await inbox.close()

