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
from collections.abc import Iterable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sessionbus.bus._jsapi import JetStreamAPIError, direct_get_last_for_subjects, status_of
from sessionbus.bus._kv import Bucket, wire_ttl
from sessionbus.bus._names import TTL_HEADER, Names
from sessionbus.bus.errors import BusError, BusTimeout

__all__ = ["Completions"]

logger = logging.getLogger(__name__)

#: Subjects asked for in one Direct Get (the server answers at most 1,024).
_LOOKUP_BATCH = 512
#: Seconds to wait for a record's confirmation before writing it again.
_CONFIRM_WAIT = 2.0
#: Seconds after which a write's reply is no longer waited for.
_REPLY_EXPIRES = 30.0
#: Writes of one record refused or unanswered before the next turn goes ahead anyway.
_CONFIRM_ATTEMPTS = 5
#: Unconfirmed records kept before those whose write already failed are dropped.
_MAX_UNCONFIRMED = 65_536


class RecordNotStored(BusError):
    """The server refused or did not confirm a completion record."""


class Completions:
    """Writes and reads one group's completion records over one connection."""

    def __init__(self, *, nc: Client, bucket: Bucket, names: Names, group: str,
                 api_prefix: str, ttl: float) -> None:
        self._nc = nc
        self._bucket = bucket
        self._names = names
        self._group = group
        self._api_prefix = api_prefix
        self._headers = {TTL_HEADER: str(wire_ttl(ttl))}
        # Records are stored under $KV.<bucket>.<key> whatever the domain a
        # worker writes them through: that is what a lookup names.
        self._stored_prefix = f"$KV.{bucket.name}."
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._tokens = itertools.count()
        # Reply token -> (loop time written, confirmation), oldest first.
        self._replies: dict[str, tuple[float, asyncio.Future[None]]] = {}
        # Session id -> (sequence, confirmation, partition) of its last write,
        # until confirmed.
        self._unconfirmed: dict[str, tuple[int, asyncio.Future[None], int]] = {}

    async def start(self) -> None:
        """Subscribe to the replies of record writes."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    async def stop(self) -> None:
        """Stop taking replies; writes not yet confirmed stay unconfirmed."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()
        for _, future in self._replies.values():
            future.cancel()
        self._replies.clear()

    @property
    def unconfirmed(self) -> int:
        """Sessions whose last record the server has not confirmed yet."""
        return len(self._unconfirmed)

    def _subject(self, session_id: str) -> str:
        return self._bucket.subject(self._names.completion_key(self._group, session_id))

    def _stored_subject(self, session_id: str) -> str:
        return self._stored_prefix + self._names.completion_key(self._group, session_id)

    async def record(self, session_id: str, seq: int, partition: int) -> None:
        """Write ``seq`` as the session's last settled sequence; :meth:`confirm` waits for it.

        Never raises for a connection that is down: the write stays
        unconfirmed, and :meth:`confirm` writes it again.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._expire(now)
        token = str(next(self._tokens))
        future: asyncio.Future[None] = loop.create_future()
        entry = (seq, future, partition)
        if len(self._unconfirmed) >= _MAX_UNCONFIRMED:
            self._drop_failed()
        self._unconfirmed[session_id] = entry
        self._replies[token] = (now, future)
        future.add_done_callback(lambda f: self._done(session_id, entry, f))
        try:
            await self._nc.publish(self._subject(session_id), str(seq).encode(),
                                   reply=f"{self._inbox}.{token}", headers=self._headers)
        except Exception as e:  # the connection: confirm() writes it again
            logger.warning("completion record %d of %r not written: %r", seq, session_id, e)
            if not future.done():
                future.set_exception(RecordNotStored(repr(e)))

    def _done(self, session_id: str, entry: tuple[int, asyncio.Future[None], int],
              future: asyncio.Future[None]) -> None:
        if (not future.cancelled() and future.exception() is None
                and self._unconfirmed.get(session_id) is entry):
            del self._unconfirmed[session_id]

    def _drop_failed(self) -> None:
        for sid, (_, future, _) in list(self._unconfirmed.items()):
            if future.done():
                del self._unconfirmed[sid]

    def forget_partition(self, partition: int) -> None:
        """Drop unconfirmed records of a partition taken away: no successor of theirs runs here.

        Writing one again later, once another owner recorded more, would
        move the record back.
        """
        for sid, entry in list(self._unconfirmed.items()):
            if entry[2] == partition:
                del self._unconfirmed[sid]

    def _expire(self, now: float) -> None:
        # Replies come in write order or never (a server that went away).
        limit = now - _REPLY_EXPIRES
        while self._replies:
            token, (written, future) = next(iter(self._replies.items()))
            if written > limit:
                break
            del self._replies[token]
            if not future.done():
                future.set_exception(RecordNotStored("no reply within "
                                                     f"{_REPLY_EXPIRES:.0f}s"))

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._replies.pop(msg.subject.rsplit(".", 1)[-1], None)
        if entry is None or entry[1].done():
            return
        future = entry[1]
        status = status_of(msg)
        if status is not None:
            future.set_exception(RecordNotStored(f"status {status.code} {status.description}"))
            return
        # A PubAck names the stream and sequence; anything else is a refusal.
        if msg.data.startswith(b'{"stream":') and b'"error"' not in msg.data:
            future.set_result(None)
        else:
            future.set_exception(RecordNotStored(f"refused: {msg.data[:200]!r}"))

    async def confirm(self, session_id: str) -> None:
        """Return once the session's last record is stored, writing it again if need be.

        Waits as long as that takes (a server restarting); a fence or a
        handback cancels the turn that waits.
        """
        attempts = 0
        while (pending := self._unconfirmed.get(session_id)) is not None:
            seq, future, partition = pending
            try:
                async with asyncio.timeout(_CONFIRM_WAIT):
                    await asyncio.shield(future)
            except (TimeoutError, RecordNotStored) as e:
                attempts += 1
                if attempts >= _CONFIRM_ATTEMPTS:
                    # Refused for good (permissions, a missing bucket) while the
                    # partition is still pulled: stalling the session forever
                    # would be worse than giving this guarantee up for one turn.
                    logger.error("completion record %d of %r not stored after %d attempts "
                                 "(%s); going on without it", seq, session_id, attempts, e)
                    if self._unconfirmed.get(session_id) is pending:
                        del self._unconfirmed[session_id]
                    return
                logger.warning("completion record %d of %r not confirmed (%s); writing it again",
                               seq, session_id, e or "timed out")
                if not future.done():
                    future.cancel()
                if isinstance(e, RecordNotStored):
                    await asyncio.sleep(_CONFIRM_WAIT)  # refused at once: do not spin
                await self.record(session_id, seq, partition)
                continue
            if self._unconfirmed.get(session_id) is pending:
                del self._unconfirmed[session_id]

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
                    api_prefix=self._api_prefix)
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
