"""Completion records: the last stream sequence a group settled, per session, in KV.

A consumer's acks are not durable the moment the server takes them: a
single nats-server writes its consumers' state lazily, so a crash can
forget acks it had already taken, and an ack still in a paused worker's
send buffer never arrives at all. The envelope then comes back, and
whoever owns its partition by then (this worker after a fence, or
another) would run a turn that had already completed, possibly after its
successor's. So when a turn settles, the worker writes
``d.<group>.<session>`` = its sequence to the workers bucket, and before
the session's next turn starts it waits for the server to confirm that
write. A worker that did not settle a session's envelopes itself reads
the record before the session's first turn there, and acks what the
record covers without running it.

Records carry a per-message TTL (``WorkerConfig.completion_ttl``): an
envelope redelivered later than that after its turn completed runs again,
as any at-least-once redelivery would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from sessionbus.bus._jsapi import JetStreamAPIError, direct_get_last_for_subjects
from sessionbus.bus._kv import Bucket, wire_ttl
from sessionbus.bus._names import TTL_HEADER, Names
from sessionbus.bus._rawpub import header_block, publish_nowait
from sessionbus.bus._rawsub import status_line, subscribe_raw, unsubscribe_raw
from sessionbus.bus.errors import BusError, BusTimeout

__all__ = ["Completions"]

logger = logging.getLogger(__name__)

#: Subjects asked for in one Direct Get (the server answers at most 1,024).
_LOOKUP_BATCH = 512
#: Seconds to wait for a record's confirmation before writing it again
#: (up to ``_SWEEP_EVERY`` more: one timer checks every wait).
_CONFIRM_WAIT = 2.0
#: Seconds between checks of the waits for confirmations.
_SWEEP_EVERY = 0.25
#: Seconds after which a write's reply is no longer waited for.
_REPLY_EXPIRES = 30.0
#: Writes of one record refused or unanswered before the next turn goes ahead anyway.
_CONFIRM_ATTEMPTS = 5
#: Unconfirmed records kept before those whose write already failed are dropped.
_MAX_UNCONFIRMED = 65_536
#: Write subjects kept per session id (a turn's record is written once per turn).
_SUBJECTS_KEPT = 16_384
#: A PubAck starts so; anything else in a reply is a refusal.
_PUB_ACK = b'{"stream":'


class RecordNotStored(BusError):
    """The server refused or did not confirm a completion record."""


@dataclass(slots=True, eq=False)
class _Write:
    """One record write, until its reply (or its expiry) settles it."""

    seq: int
    partition: int
    written: float
    settled: bool = False
    error: RecordNotStored | None = None
    waiter: asyncio.Future[None] | None = None
    """Created only when a turn waits for this write."""
    wait_until: float = 0.0
    """Loop time the current wait for this write gives up."""

    def settle(self, error: RecordNotStored | None) -> None:
        if self.settled:
            return
        self.settled = True
        self.error = error
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Completions:
    """Writes and reads one group's completion records over one connection."""

    def __init__(self, *, nc: Client, bucket: Bucket, names: Names, group: str,
                 api_prefix: str, ttl: float) -> None:
        self._nc = nc
        self._bucket = bucket
        self._names = names
        self._group = group
        self._api_prefix = api_prefix
        self._headers = header_block({TTL_HEADER: str(wire_ttl(ttl))})
        # Records are stored under $KV.<bucket>.<key> whatever the domain a
        # worker writes them through: that is what a lookup names.
        self._stored_prefix = f"$KV.{bucket.name}."
        self._inbox = nc.new_inbox()
        self._reply_prefix = len(self._inbox) + 1
        self._sub: object | None = None
        self._tokens = itertools.count()
        # Reply token -> (session id, write), oldest first: replies come in
        # write order or never (a server that went away).
        self._writes: dict[int, tuple[str, _Write]] = {}
        # Session id -> its last write, until the server confirms it.
        self._unconfirmed: dict[str, _Write] = {}
        self._subjects: dict[str, str] = {}
        # Writes waited for, and the one timer that ends overdue waits: a
        # timeout (and a shield) per turn cost more than the rest of the wait.
        self._waiting: list[_Write] = []
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Subscribe to the replies of record writes."""
        if self._sub is None:
            # Replies skip nats-py's message objects and subscription queue:
            # one per handled turn, and all a reply says is in a few bytes.
            self._sub = await subscribe_raw(self._nc, f"{self._inbox}.*", self._on_reply)

    async def stop(self) -> None:
        """Stop taking replies; writes not yet confirmed stay unconfirmed."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await unsubscribe_raw(self._nc, sub)
        for _, write in self._writes.values():
            if write.waiter is not None:
                write.waiter.cancel()
        self._writes.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._waiting.clear()

    @property
    def unconfirmed(self) -> int:
        """Sessions whose last record the server has not confirmed yet."""
        return len(self._unconfirmed)

    def _subject(self, session_id: str) -> str:
        subject = self._subjects.get(session_id)
        if subject is None:
            if len(self._subjects) >= _SUBJECTS_KEPT:
                self._subjects.clear()
            subject = self._bucket.subject(self._names.completion_key(self._group, session_id))
            self._subjects[session_id] = subject
        return subject

    def _stored_subject(self, session_id: str) -> str:
        return self._stored_prefix + self._names.completion_key(self._group, session_id)

    async def record(self, session_id: str, seq: int, partition: int) -> None:
        """Write ``seq`` as the session's last settled sequence; :meth:`confirm` waits for it.

        Never raises for a connection that is down: the write stays
        unconfirmed, and :meth:`confirm` writes it again.
        """
        flush = self.record_nowait(session_id, seq, partition)
        if flush is not None:
            await flush

    def record_nowait(self, session_id: str, seq: int,
                      partition: int) -> Coroutine[Any, Any, None] | None:
        """:meth:`record` without a coroutine: the flush to await, if any (``publish_nowait``)."""
        now = asyncio.get_running_loop().time()
        self._expire(now)
        token = next(self._tokens)
        write = _Write(seq, partition, now)
        if len(self._unconfirmed) >= _MAX_UNCONFIRMED:
            self._drop_failed()
        self._unconfirmed[session_id] = write
        self._writes[token] = (session_id, write)
        try:
            flush = publish_nowait(self._nc, self._subject(session_id), str(seq).encode(),
                                   reply=f"{self._inbox}.{token}", headers=self._headers)
        except Exception as e:  # the connection: confirm() writes it again
            self._not_written(session_id, token, write, e)
            return None
        return None if flush is None else self._flushed(flush, session_id, token, write)

    async def _flushed(self, flush: Coroutine[Any, Any, None], session_id: str, token: int,
                       write: _Write) -> None:
        """Await the flush ``publish_nowait`` handed back; its failure is the write's."""
        try:
            await flush
        except Exception as e:  # the connection: confirm() writes it again
            self._not_written(session_id, token, write, e)

    def _not_written(self, session_id: str, token: int, write: _Write, error: Exception) -> None:
        logger.warning("completion record %d of %r not written: %r", write.seq, session_id, error)
        self._writes.pop(token, None)
        write.settle(RecordNotStored(repr(error)))

    def pending(self, session_id: str) -> bool:
        """Whether the session's last record is not confirmed yet (:meth:`confirm` would wait)."""
        return session_id in self._unconfirmed

    def _wait_for(self, write: _Write) -> asyncio.Future[None]:
        """A future settled with ``write``, or failed with TimeoutError once it is overdue."""
        loop = asyncio.get_running_loop()
        write.wait_until = loop.time() + _CONFIRM_WAIT
        self._waiting.append(write)
        if self._sweeper is None:
            self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)
        return loop.create_future()

    def _sweep(self) -> None:
        """End the overdue waits; check again later while any are left."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        left = []
        for write in self._waiting:
            waiter = write.waiter
            if waiter is None or waiter.done():
                continue  # settled, or its turn was cancelled
            if now >= write.wait_until:
                waiter.set_exception(TimeoutError(
                    f"no confirmation within {_CONFIRM_WAIT:.0f}s"))
            else:
                left.append(write)
        self._waiting = left
        if left:
            self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    def _drop_failed(self) -> None:
        for sid, write in list(self._unconfirmed.items()):
            if write.settled:
                del self._unconfirmed[sid]

    def forget_partition(self, partition: int) -> None:
        """Drop unconfirmed records of a partition taken away: no successor of theirs runs here.

        Writing one again later, once another owner recorded more, would
        move the record back.
        """
        for sid, write in list(self._unconfirmed.items()):
            if write.partition == partition:
                del self._unconfirmed[sid]

    def _expire(self, now: float) -> None:
        limit = now - _REPLY_EXPIRES
        writes = self._writes
        while writes:
            token = next(iter(writes))
            write = writes[token][1]
            if write.written > limit:
                break
            del writes[token]
            write.settle(RecordNotStored(f"no reply within {_REPLY_EXPIRES:.0f}s"))

    def _on_reply(self, subject: bytes, reply: bytes, data: bytes,
                  headers: bytes | None) -> None:
        try:
            entry = self._writes.pop(int(subject[self._reply_prefix:]), None)
        except ValueError:
            return
        if entry is None:
            return
        session_id, write = entry
        status = None if data else status_line(headers)
        if data.startswith(_PUB_ACK) and b'"error"' not in data:
            if self._unconfirmed.get(session_id) is write:
                del self._unconfirmed[session_id]
            write.settle(None)
        elif status is not None:  # a status instead of a PubAck (503: no stream answered)
            write.settle(RecordNotStored(f"status {status[0]} {status[1]}".rstrip()))
        else:
            write.settle(RecordNotStored(f"refused: {data[:200]!r}"))

    async def confirm(self, session_id: str) -> None:
        """Return once the session's last record is stored, writing it again if need be.

        Gives up after 5 writes refused or unconfirmed (each waited for
        about 2 s), logging it; a fence or a handback cancels the waiting
        turn before that. One turn of a session waits at a time (the
        scheduler runs them one by one), so a cancelled wait can take its
        write's waiter with it: the next wait makes another.
        """
        attempts = 0
        while (write := self._unconfirmed.get(session_id)) is not None:
            error: BaseException | None = write.error
            if not write.settled:
                waiter = write.waiter
                if waiter is None or waiter.done():
                    waiter = write.waiter = self._wait_for(write)
                try:
                    await waiter
                except TimeoutError as e:
                    # A reply in the same loop step as the timeout still counts.
                    error = write.error if write.settled else e
                else:
                    error = write.error
            if error is None:
                if self._unconfirmed.get(session_id) is write:
                    del self._unconfirmed[session_id]
                continue
            attempts += 1
            if attempts >= _CONFIRM_ATTEMPTS:
                # Refused for good (permissions, a missing bucket) while the
                # partition is still pulled: stalling the session forever
                # would be worse than giving this guarantee up for one turn.
                logger.error("completion record %d of %r not stored after %d attempts "
                             "(%s); going on without it", write.seq, session_id, attempts, error)
                if self._unconfirmed.get(session_id) is write:
                    del self._unconfirmed[session_id]
                return
            logger.warning("completion record %d of %r not confirmed (%s); writing it again",
                           write.seq, session_id, error or "timed out")
            write.settle(RecordNotStored("written again"))
            if isinstance(error, RecordNotStored):
                await asyncio.sleep(_CONFIRM_WAIT)  # refused at once: do not spin
            await self.record(session_id, write.seq, write.partition)

    async def lookup(self, session_ids: Iterable[str]) -> dict[str, int]:
        """The recorded last settled sequence of each session (absent: none recorded)."""
        by_subject = {self._stored_subject(sid): sid for sid in session_ids}
        subjects = list(by_subject)
        found: dict[str, int] = {}
        for start in range(0, len(subjects), _LOOKUP_BATCH):
            try:
                msgs = await direct_get_last_for_subjects(
                    self._nc, stream=self._bucket.stream,
                    subjects=subjects[start:start + _LOOKUP_BATCH],
                    api_prefix=self._api_prefix, replies=self._bucket.replies)
            except JetStreamAPIError as e:
                raise BusError(f"reading completion records failed: {e}") from e
            except TimeoutError as e:
                raise BusTimeout("reading completion records timed out") from e
            for m in msgs:
                sid = by_subject.get(m.subject)
                if sid is None or "KV-Operation" in m.headers:
                    continue
                try:
                    found[sid] = int(m.data)
                except ValueError:
                    logger.warning("ignoring a malformed completion record of %r: %r",
                                   sid, m.data[:64])
        return found
