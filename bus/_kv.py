"""A JetStream key-value bucket with per-key TTLs, markers and filtered listing.

nats-py's ``KeyValue`` covers plain puts and gets. What sessionbus needs on
top, kept here so every component does it the same way:

* per-key TTL on any write, including compare-and-set updates and lease
  refreshes (nats-py's ``update()`` cannot set one): raw publishes with
  ``Nats-TTL`` and ``Nats-Expected-Last-Subject-Sequence``;
* TTLs are whole seconds on the wire, so they are rounded up here and the
  caller keeps an exact ``expires_at`` in the value when it matters;
* a watcher that reports server-placed TTL markers (``Nats-Marker-Reason:
  MaxAge``) as :attr:`KVOp.EXPIRED`, distinct from deletes;
* listing by a subject filter on the server (Direct Get ``multi_last``,
  or past its 1,024 subjects a one-shot consumer deleted when done),
  never a client-side scan of every key.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from sessionbus.bus._jsapi import (
    DEFAULT_API_PREFIX,
    JetStreamAPIError,
    TooManyResultsError,
    ack_numbers,
    direct_answer,
    direct_get_last_for_subjects,
)
from sessionbus.bus._names import MSG_ID_HEADER, kv_subject
from sessionbus.bus._reads import last_per_subject
from sessionbus.bus._replies import (
    DUPLICATE_IN_PROCESS,
    NoResponders,
    Pending,
    Replies,
    acked_sequence,
)
from sessionbus.bus._retry import Retry, Unanswered
from sessionbus.bus.errors import BusTimeout, ConfigError, ConnectionFailed, KeyConflict
from sessionbus.schemas.envelope import new_envelope_id

__all__ = ["MAX_GET_MANY", "Bucket", "KVEntry", "KVEvent", "KVOp", "bind_bucket", "wire_ttl"]

logger = logging.getLogger(__name__)

_WRONG_LAST_SEQUENCE = (10071, 10164)
#: Most keys one :meth:`Bucket.get_many` reads (a Direct Get answers 1,024 subjects).
MAX_GET_MANY = 256
#: Seconds an ended watch spends deleting its consumer at most (a server
#: that stopped answering must not hold up whoever ended it).
_END_WATCH_WITHIN = 1.0
_KV_OP = "KV-Operation"
_MARKER = "Nats-Marker-Reason"
_SEQUENCE = "Nats-Sequence"
_SUBJECT = "Nats-Subject"
_TTL = "Nats-TTL"
_EXPECT_LAST = "Nats-Expected-Last-Subject-Sequence"
_EXPECT_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
_WRONG_LAST_MSG_ID = 10070
#: How the server names the revision a compare-and-set write found instead.
_FOUND_LAST = re.compile(r"wrong last sequence: (\d+)")
#: Times a compare-and-set write sent again asks whether its id is known,
#: the key moving on before each answer.
_ID_PROBES = 5


def wire_ttl(ttl: float) -> int:
    """Seconds to put in ``Nats-TTL``: the server counts whole seconds, at least 1."""
    if not ttl > 0:
        raise ConfigError(f"ttl must be > 0, got {ttl!r}")
    return max(1, math.ceil(ttl))


class KVOp(StrEnum):
    """What happened to a key, as a watcher sees it."""

    PUT = "put"
    DELETE = "delete"
    PURGE = "purge"
    #: The key's TTL ran out and the server placed a marker.
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class KVEntry:
    """A key's current value and revision."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One change seen by :meth:`Bucket.watch`. ``value`` is empty unless PUT.

    ``pending`` is how many changes the watch had still to deliver after
    this one (0 when caught up, and for reads).
    """

    key: str
    op: KVOp
    value: bytes
    revision: int
    pending: int = 0


@dataclass(frozen=True, slots=True)
class _Last:
    """A key's last stored message, as a Direct Get answered it."""

    seq: int
    data: bytes
    headers: dict[str, str]


def _op_of(headers: dict[str, str] | None) -> KVOp:
    if not headers:
        return KVOp.PUT
    op = headers.get(_KV_OP)
    if op == "DEL":
        return KVOp.DELETE
    if op == "PURGE":
        return KVOp.PURGE
    reason = headers.get(_MARKER)
    if reason == "MaxAge":
        return KVOp.EXPIRED
    if reason == "Remove":
        return KVOp.DELETE
    if reason == "Purge":
        return KVOp.PURGE
    return KVOp.PUT


def _delivery(msg: Msg) -> tuple[int, int]:
    """The stream sequence and the consumer's pending count of a delivery."""
    numbers = ack_numbers(msg.reply or "")
    if numbers is not None:
        return numbers.stream_seq, numbers.pending
    meta = msg.metadata
    return int(meta.sequence.stream), int(meta.num_pending or 0)


class _Refused(Exception):
    """A write the stream refused in a way a write sent again may explain.

    ``error`` is what the caller gets otherwise (raised from its own
    ``__cause__``: the refusal itself is not a cause); ``found`` the
    revision a compare-and-set found (None: a copy with the same id, or
    another write to the key, is still being stored).
    """

    def __init__(self, error: Exception, found: int | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.found = found


class Bucket:
    """One KV bucket, addressed through a JetStream context (and its domain)."""

    def __init__(
        self, *, nc: Client, js: JetStreamContext, name: str, domain: str | None = None,
        timeout: float = 5.0, duplicate_window: float | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.name = name
        self.stream = f"KV_{name}"
        self.domain = domain
        self.timeout = timeout
        self.duplicate_window = duplicate_window
        """Seconds the bucket's stream knows a write's ``Nats-Msg-Id`` (None: not known).

        Writes that get no answer are sent again only when it is known
        (see :meth:`_publish`).
        """
        self._pre = f"$KV.{name}."
        self._api_prefix = f"$JS.{domain}.API" if domain else DEFAULT_API_PREFIX
        self._replies = Replies(nc)
        self._direct_get = f"{self._api_prefix}.DIRECT.GET.{self.stream}"

    @property
    def replies(self) -> Replies:
        """The inbox the bucket's writes and reads are answered on."""
        return self._replies

    def subject(self, key: str) -> str:
        """Subject a write to ``key`` is published on (domain-aware)."""
        return kv_subject(self.name, key, self.domain)

    async def get(self, key: str) -> KVEntry | None:
        """The key's current value, or None if absent, deleted or expired."""
        msg = await self._direct_last(key)
        if msg is None or _op_of(msg.headers) is not KVOp.PUT:
            return None
        return KVEntry(key=key, value=msg.data, revision=msg.seq)

    async def get_many(self, keys: builtins.list[str]) -> dict[str, KVEntry]:
        """The current value of each of ``keys`` that has one, in one Direct Get.

        A ``multi_last`` request naming the keys themselves (no wildcard), so
        at most :data:`MAX_GET_MANY` keys a call; absent, deleted and expired
        keys are left out, as :meth:`get` returns None for them.
        """
        if len(keys) > MAX_GET_MANY:
            raise ConfigError(f"get_many takes at most {MAX_GET_MANY} keys, got {len(keys)}")
        if not keys:
            return {}
        retry = Retry(self.timeout)
        while True:
            try:
                async with asyncio.timeout(retry.attempt_timeout()):
                    found = await direct_get_last_for_subjects(
                        self.nc, stream=self.stream, subjects=[self._pre + k for k in keys],
                        api_prefix=self._api_prefix, replies=self._replies,
                    )
                break
            except (TimeoutError, JetStreamAPIError) as e:
                if isinstance(e, JetStreamAPIError) and e.code != 503:
                    raise
                if not await retry.again(e):
                    raise retry.error(e, f"get {len(keys)} keys of {self.name}") from e
        out = {}
        for m in found:
            if _op_of(m.headers) is KVOp.PUT:
                key = m.subject[len(self._pre):]
                out[key] = KVEntry(key=key, value=m.data or b"", revision=m.seq)
        return out

    async def head(self, key: str) -> KVEvent | None:
        """The key's last stored message, value or marker, as a :class:`KVEvent`.

        Tells a deleted key (DELETE/PURGE) from an expired one (EXPIRED)
        while the marker lasts; None once the key holds nothing at all. The
        revision is what a compare-and-set must name to write the key again.
        """
        msg = await self._direct_last(key)
        if msg is None:
            return None
        op = _op_of(msg.headers)
        value = msg.data if op is KVOp.PUT else b""
        return KVEvent(key=key, op=op, value=value, revision=msg.seq)

    async def revision(self) -> int:
        """The bucket's latest revision (its stream's last sequence)."""
        try:
            info = await self.js.stream_info(self.stream)
        except nats.errors.TimeoutError as e:
            raise BusTimeout(f"info of bucket {self.name} timed out") from e
        except nats.errors.NoRespondersError as e:
            raise ConnectionFailed(f"no JetStream answering for bucket {self.name}") from e
        return int(info.state.last_seq)

    async def _direct_last(self, key: str) -> _Last | None:
        """The key's last stored message by a Direct Get, None if the key holds none.

        Requested on the bucket's write-reply inbox and read as bytes (see
        ``bus/_replies.py``): a get costs one round trip and no nats-py
        request. Any replica answers.
        """
        subject = self._pre + key
        what = f"get {self.name}/{key}"
        request = json.dumps({"last_by_subj": subject}).encode()
        retry = Retry(self.timeout)
        while True:
            pending = await self._replies.send(self._direct_get, request, None)
            try:
                reply = await self._replies.wait(pending, within=retry.attempt_timeout(),
                                                 what=what)
                break
            except (BusTimeout, NoResponders) as e:
                cause = TimeoutError() if isinstance(e, BusTimeout) else e
                if not await retry.again(cause):
                    raise retry.error(cause, what) from e
        fields = direct_answer(reply, what)
        if fields is None:
            return None
        seq = fields.get(_SEQUENCE, "")
        if fields.get(_SUBJECT) != subject or not seq.isdigit():
            return None
        return _Last(int(seq), reply.data, fields)

    async def _publish(self, key: str, value: bytes, headers: dict[str, str],
                       also: Callable[[], Awaitable[None]] | None = None, *,
                       resend_within: float | None = None,
                       resend_unanswered: bool = True) -> int:
        """Write and wait for the stream's ack; ``also`` is published before the wait.

        A write that reached no stream (no responders) is sent again, ``also``
        with it, paced as reads are, for ``resend_within`` seconds (the
        bucket's timeout by default): a stream electing a new leader takes
        writes again within seconds. Then ConnectionFailed.

        An attempt that got no answer at all may have been stored. When the
        bucket's :attr:`duplicate_window` is known (and ``resend_unanswered``),
        the write carries an id of its own (``Nats-Msg-Id``) and is sent
        again, ``UNANSWERED_WRITES`` attempts in all, each given the
        bucket's timeout, as long as the next attempt's wait ends inside the
        window counted from the first attempt:

        * a write stored before is acknowledged as a duplicate, with its
          revision, and not stored again;
        * but a single server checks a compare-and-set's revision before the
          id, and refuses it: the write then asks whether the id is known
          (:meth:`_own_revision`), and a known one gives its revision;
        * while a replicated stream's leader is still storing the first copy
          it refuses another ("in process"): sent again, paced.

        Once an attempt went unanswered, what cannot tell whether the write
        was stored raises BusTimeout (never ConnectionFailed, nor KeyConflict
        unless the id is known not to be stored).
        """
        write_id = None
        window = self.duplicate_window
        if resend_unanswered and window:
            write_id = new_envelope_id()
            headers = {**headers, MSG_ID_HEADER: write_id}
        what = f"write {self.name}/{key}"
        retry = Retry(self.timeout if resend_within is None else resend_within)
        within = self.timeout
        first_sent = time.monotonic()
        unanswered: Unanswered | None = None
        while True:
            pending = await self._replies.send(self.subject(key), value, headers or None)
            if also is not None:
                try:
                    await also()
                except BaseException:
                    self._replies.discard(pending)
                    raise
            try:
                return await self._acked(key, pending, headers, within)
            except NoResponders as e:
                # A later attempt waits only for what is left of the time.
                resend_wait = await retry.resend(e)
                if resend_wait is None:
                    if unanswered is not None:
                        raise BusTimeout(f"{what}: an attempt got no answer, and then no "
                                         f"stream took it (it may be stored)") from e
                    raise ConnectionFailed(str(e)) from e
                within = resend_wait
            except ConnectionFailed as e:  # a bare status: a route cut mid-write
                if unanswered is None:
                    raise
                raise BusTimeout(f"{what}: an attempt got no answer, and then {e}") from e
            except BusTimeout as e:
                if (write_id is None or window is None
                        or time.monotonic() - first_sent + self.timeout >= window):
                    raise
                unanswered = unanswered or Unanswered(what)
                unanswered.again(e)  # raises at the bound
                retry, within = Retry(self.timeout), self.timeout
            except _Refused as e:
                if unanswered is None or write_id is None:
                    raise e.error from e.error.__cause__
                if e.found is not None:  # the compare-and-set found another revision
                    assert window is not None
                    own = await self._own_revision(key, value, headers, e.found,
                                                   known_until=first_sent + window)
                    if own is not None:
                        return own
                    raise e.error from e.error.__cause__
                # In process: the leader still stores an earlier attempt.
                left = await retry.resend(e.error)
                if left is None:
                    raise BusTimeout(f"{what}: an attempt got no answer, and one is still "
                                     f"being stored") from e.error
                within = left

    async def _acked(self, key: str, pending: Pending, headers: dict[str, str],
                     within: float) -> int:
        what = f"write {self.name}/{key}"
        reply = await self._replies.wait(pending, within=within, what=what)
        try:
            return acked_sequence(reply, what)
        except nats.js.errors.APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                expected = headers.get(_EXPECT_LAST)
                conflict = KeyConflict(key, int(expected) if expected else None)
                conflict.__cause__ = e
                found = _FOUND_LAST.search(e.description or "")
                raise _Refused(conflict, int(found.group(1)) if found else None) from e
            if e.err_code == DUPLICATE_IN_PROCESS:
                raise _Refused(e, None) from e
            raise

    async def _own_revision(self, key: str, value: bytes, headers: dict[str, str],
                            found: int, *, known_until: float) -> int | None:
        """The revision of this write if the stream knows its id, None if it does not.

        For a compare-and-set write (``headers`` with its ``Nats-Msg-Id``)
        refused at revision ``found`` after an earlier attempt got no answer.

        A replicated stream checks the id before the revision: the refusal
        already says that the id is not known (None). A single server checks
        the revision first, so it is asked: the write is sent again at
        ``found``, expecting a last message id that no message has. It
        answers a duplicate if it knows the id (the first copy's revision,
        even if another write has replaced that copy since), and refuses it
        without storing anything if not. A key that moved on meanwhile is
        asked again at its new revision. Each question is sent only if its
        answer is due before ``known_until`` (the ``time.monotonic()`` at which
        the server may forget the id). BusTimeout when that cannot tell (no
        answer, the key kept moving, or no time left).

        Never asked of a replicated stream: there the expected last id is
        checked only as each replica stores the message, and a mismatch
        leaves the stream unable to store anything (nats-server 2.15).
        """
        what = f"write {self.name}/{key}"
        try:
            info = await self.js.stream_info(self.stream)
        except (nats.errors.Error, OSError) as e:
            raise BusTimeout(f"{what}: an attempt got no answer, and the bucket's stream "
                             f"could not be read to ask whether it was stored: {e!r}") from e
        if (info.config.num_replicas or 1) > 1:
            return None
        probe = {**headers, _EXPECT_LAST_MSG_ID: new_envelope_id()}
        for _ in range(_ID_PROBES):
            if time.monotonic() + self.timeout >= known_until:
                break
            probe[_EXPECT_LAST] = str(found)
            pending = await self._replies.send(self.subject(key), value, probe)
            try:
                reply = await self._replies.wait(pending, within=self.timeout, what=what)
            except NoResponders as e:
                raise BusTimeout(f"{what}: an attempt got no answer, and then no stream "
                                 f"took it (it may be stored)") from e
            try:
                return acked_sequence(reply, what)
            except ConnectionFailed as e:
                raise BusTimeout(f"{what}: an attempt got no answer, and then {e}") from e
            except nats.js.errors.APIError as e:
                if e.err_code == _WRONG_LAST_MSG_ID:
                    return None
                moved = (_FOUND_LAST.search(e.description or "")
                         if e.err_code in _WRONG_LAST_SEQUENCE else None)
                if moved is None:
                    raise
                found = int(moved.group(1))
        raise BusTimeout(f"{what}: an attempt got no answer, and whether it was stored "
                         f"could not be told in time (the key kept changing)")

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write unconditionally; with ``ttl`` the key expires that many seconds later.

        Sent again when unanswered, as :meth:`_publish` says.
        """
        headers = {} if ttl is None else {_TTL: str(wire_ttl(ttl))}
        return await self._publish(key, value, headers)

    async def update(self, key: str, value: bytes, *, last: int, ttl: float | None = None,
                     also: Callable[[], Awaitable[None]] | None = None,
                     resend_within: float | None = None, resend_unanswered: bool = True) -> int:
        """Write only if the key is at revision ``last`` (0: absent); else KeyConflict.

        ``also`` is awaited once the write is on its way, before its ack is
        awaited: a publish there leaves in the same flush (again with each
        resend). ``resend_within``: how long a write no stream took is sent
        again (the bucket's timeout by default; 0: never).
        ``resend_unanswered``: whether a write that got no answer is sent
        again (see :meth:`_publish`); False for a caller that does so itself.
        """
        headers = {_EXPECT_LAST: str(last)}
        if ttl is not None:
            headers[_TTL] = str(wire_ttl(ttl))
        return await self._publish(key, value, headers, also, resend_within=resend_within,
                                   resend_unanswered=resend_unanswered)

    async def create(self, key: str, value: bytes, *, ttl: float | None = None,
                     resend_within: float | None = None, resend_unanswered: bool = True) -> int:
        """Write only if the key is absent, deleted or expired; else KeyConflict.

        After a delete or an expiry the key's last message is a marker, so a
        plain "expect revision 0" fails: retry against the marker's revision.
        ``resend_within`` and ``resend_unanswered`` as in :meth:`update`.
        """
        revision, _ = await self.insert(key, value, ttl=ttl, resend_within=resend_within,
                                        resend_unanswered=resend_unanswered)
        return revision

    async def insert(self, key: str, value: bytes, *, ttl: float | None = None,
                     also: Callable[[], Awaitable[None]] | None = None,
                     resend_within: float | None = None,
                     resend_unanswered: bool = True) -> tuple[int, bool]:
        """:meth:`create`, also telling whether the key held anything before.

        Returns the revision and ``replaced``: False when the key's subject
        held no message at all (never written, or its last marker expired
        too), True when it held a delete or expiry marker. Known without an
        extra round trip: only a replacement needs the retry. ``also`` goes
        with the first write only (and its resends), as in :meth:`update`.
        """
        try:
            return await self.update(key, value, last=0, ttl=ttl, also=also,
                                     resend_within=resend_within,
                                     resend_unanswered=resend_unanswered), False
        except KeyConflict:
            head = await self.head(key)
            if head is not None and head.op is KVOp.PUT:
                raise
            last = head.revision if head else 0
            return await self.update(key, value, last=last, ttl=ttl,
                                     resend_within=resend_within,
                                     resend_unanswered=resend_unanswered), True

    async def delete(self, key: str, *, last: int | None = None, ttl: float | None = None,
                     resend_unanswered: bool = True) -> int:
        """Place a delete marker (only at revision ``last`` if given); return its revision.

        With ``ttl`` the marker itself goes away that long after, so keys that
        come and go (locks) do not leave one marker each behind forever.
        ``resend_unanswered`` as in :meth:`update`.
        """
        headers = {_KV_OP: "DEL"}
        if last is not None:
            headers[_EXPECT_LAST] = str(last)
        if ttl is not None:
            headers[_TTL] = str(wire_ttl(ttl))
        return await self._publish(key, b"", headers, resend_unanswered=resend_unanswered)

    async def purge(self, key: str) -> None:
        """Remove the key and its history, leaving a purge marker."""
        await self._publish(key, b"", {_KV_OP: "PURGE", "Nats-Rollup": "sub"})

    async def list(self, key_filter: str = ">") -> list[KVEntry]:
        """Current entries whose key matches ``key_filter``, filtered by the server.

        A Direct Get ``multi_last`` on the filter: no consumer, and only
        matching keys cross the network. The server answers at most 1024
        subjects (markers included) per filter; past that the listing reads
        the last message per subject through a one-shot consumer, deleted
        when the listing is done.
        """
        retry = Retry(self.timeout)
        while True:
            try:
                async with asyncio.timeout(retry.attempt_timeout()):
                    found = await direct_get_last_for_subjects(
                        self.nc, stream=self.stream, subjects=[self._pre + key_filter],
                        api_prefix=self._api_prefix, replies=self._replies,
                    )
                break
            except TooManyResultsError:
                return await self._list_by_consumer(key_filter, retry)
            except (TimeoutError, JetStreamAPIError) as e:
                if isinstance(e, JetStreamAPIError) and e.code != 503:
                    raise
                if not await retry.again(e):
                    raise retry.error(e, f"list {self.name}/{key_filter}") from e
        return [
            KVEntry(key=m.subject[len(self._pre):], value=m.data or b"", revision=m.seq)
            for m in found
            if _op_of(m.headers) is KVOp.PUT
        ]

    async def _list_by_consumer(self, key_filter: str, retry: Retry
                                ) -> builtins.list[KVEntry]:
        while True:
            try:
                found = await last_per_subject(
                    self.nc, stream=self.stream, subject_filter=self._pre + key_filter,
                    api_prefix=self._api_prefix,
                )
                break
            except (BusTimeout, JetStreamAPIError) as e:
                if isinstance(e, JetStreamAPIError) and e.code != 503:
                    raise
                cause = TimeoutError() if isinstance(e, BusTimeout) else e
                if not await retry.again(cause):
                    raise retry.error(cause, f"list {self.name}/{key_filter}") from e
        return [
            KVEntry(key=m.subject[len(self._pre):], value=m.data or b"", revision=m.seq)
            for m in found
            if _op_of(m.headers) is KVOp.PUT
        ]

    def watch(
        self, key_filter: str = ">", *, include_existing: bool = False, meta_only: bool = False,
        ready: asyncio.Event | None = None,
    ) -> AsyncIterator[KVEvent]:
        """Changes to keys matching ``key_filter``, forever (cancel to stop).

        With ``include_existing`` the current value of every matching key
        comes first. Expiry markers arrive as :attr:`KVOp.EXPIRED`. ``ready``
        is set once the watch is subscribed: every change after that is seen.
        """
        # Return the generator itself rather than re-yielding from it: on
        # Python 3.11 a cancel delivered inside a nested async generator can
        # be lost, leaving the watching task waiting forever.
        return self._consume(
            key_filter, last_per_subject=include_existing, meta_only=meta_only, ready=ready
        )

    async def _consume(
        self, key_filter: str, *, last_per_subject: bool, meta_only: bool = False,
        ready: asyncio.Event | None = None,
    ) -> AsyncIterator[KVEvent]:
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            queue.put_nowait(msg)

        policy = api.DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else api.DeliverPolicy.NEW
        sub = await self.js.subscribe(
            self._pre + key_filter, stream=self.stream, cb=on_msg, ordered_consumer=True,
            deliver_policy=policy, headers_only=meta_only, inactive_threshold=300.0,
        )
        if ready is not None:
            ready.set()
        try:
            while True:
                msg = await queue.get()
                revision, pending = _delivery(msg)
                yield KVEvent(
                    key=msg.subject[len(self._pre):],
                    op=_op_of(msg.headers),
                    value=msg.data or b"",
                    revision=revision,
                    pending=pending,
                )
        finally:
            await self._end_watch(sub)

    async def _end_watch(self, sub: JetStreamContext.PushSubscription) -> None:
        """Unsubscribe, then delete the watch's consumer.

        Left alone, the server would keep the ordered consumer for its
        inactive threshold (which lets it outlive a reconnect), and a bucket
        watched briefly but often would collect hundreds of them.
        Unsubscribing first also stops nats-py's heartbeat check, which
        would otherwise recreate a consumer it finds gone.
        """
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if not self.nc.is_connected:
            return  # no server to ask: the consumer lingers, and nothing waits for it
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(self.timeout, _END_WATCH_WITHIN)):
                info = await sub.consumer_info()
                await self.js.delete_consumer(self.stream, info.name)


async def bind_bucket(
    nc: Client, js: JetStreamContext, name: str, *, replicas: int, domain: str | None,
    request_timeout: float, check: Callable[[api.StreamInfo], object] | None = None,
) -> Bucket:
    """The bucket ``name``, created as :func:`bucket_config` says if absent.

    ``request_timeout`` is the bucket's :attr:`Bucket.timeout`; ``check`` is
    called with its stream's info (it raises to refuse it).
    The bucket takes its stream's duplicate window, whoever created it.
    """
    stream = f"KV_{name}"
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.create_key_value(bucket_config(name, replicas=replicas))
        except nats.js.errors.BadRequestError as e:
            if e.err_code != 10058:  # created concurrently by another node
                raise
        info = await js.stream_info(stream)
    if check is not None:
        check(info)
    return Bucket(nc=nc, js=js, name=name, domain=domain, timeout=request_timeout,
                  duplicate_window=info.config.duplicate_window or None)


def bucket_config(name: str, *, replicas: int, marker_ttl: float = 60.0, **extra: Any
                  ) -> api.KeyValueConfig:
    """The config every sessionbus bucket is created with."""
    return api.KeyValueConfig(
        bucket=name, history=1, replicas=replicas, direct=True,
        limit_marker_ttl=marker_ttl, **extra,
    )
