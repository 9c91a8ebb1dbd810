"""The recent history of the sessions a worker serves, kept from what it pulls.

Every envelope of a session is stored in the session's partition, and the
worker that owns the partition pulls every one of them, in stream order,
through the partition's consumer. So the worker can keep each session's
history as it goes and hand it to a turn without reading the stream:
``turn.history()`` costs a window on a list for what the worker has seen,
and a Direct Get batch of the gap otherwise (what was stored before the
worker first saw the session, or what fell off the per-session bound).

The cache is only trusted while the worker has seen *every* delivery of
the partition's consumer: deliveries carry the consumer's delivery
sequence, which counts every delivery to any client. A step other than +1
means some delivery went elsewhere (the pin moved, a pull's answer was
lost, a restart), and the partition's cached sessions are dropped. A
partition handed back drops them too. Dropping only costs a cold read.

A turn sees exactly what is stored up to and including its own envelope,
in stream order, nothing stored after it; envelopes past their
``ttl_seconds`` are left out when read, as in ``Session.history()``.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import OrderedDict

from sessionbus.bus._history import read_history, read_newest
from sessionbus.bus.core import SessionBus
from sessionbus.schemas import Envelope
from sessionbus.workers._historyseq import History

__all__ = ["RecentHistory", "read_up_to"]


async def read_up_to(bus: SessionBus, sid: str, up_to: int, last: int | None) -> History:
    """The session's unexpired envelopes stored up to ``up_to``, read from the stream.

    With ``last``, only the newest ``last``, read from where they start
    (``read_newest``), not from the session's start. The read waits for a
    replica that is behind to reach ``up_to`` (a turn's own envelope).
    """
    if last is not None:
        newest, _ = await read_newest(bus, sid, last, up_to=up_to, must_reach=up_to)
        return History(newest)
    now = time.time()
    read = await read_history(bus, sid, up_to=up_to, must_reach=up_to)
    return History([e for _, e in read if not e.is_expired(now)])


class _Entry:
    """Everything stored for one session with ``known_after < seq <= hi``.

    The session's envelopes are ``envelopes[start:]`` (their sequences
    ``seqs[start:]``). Both lists are only ever appended to: dropping old
    envelopes moves ``start``, and when the dropped part reaches a quarter
    of the per-session bound, or older envelopes go in front, the entry
    takes new lists (so it holds at most 1.25 times the bound). So a
    :class:`~sessionbus.workers._historyseq.History` window handed to a
    turn stays what it was, whatever the worker pulls meanwhile.
    """

    __slots__ = ("envelopes", "hi", "known_after", "partition", "seqs", "start", "ttls")

    def __init__(self, partition: int, known_after: int) -> None:
        self.partition = partition
        self.known_after = known_after
        self.hi = known_after
        self.seqs: list[int] = []
        self.envelopes: list[Envelope] = []
        self.start = 0
        self.ttls = 0

    def __len__(self) -> int:
        return len(self.seqs) - self.start

    def add(self, seq: int, envelope: Envelope) -> None:
        self.seqs.append(seq)
        self.envelopes.append(envelope)
        if envelope.ttl_seconds is not None:
            self.ttls += 1

    def trim(self, keep: int) -> int:
        """Keep the newest ``keep`` envelopes; returns how many were dropped."""
        start = self.start
        drop = len(self.seqs) - start - keep
        if drop <= 0:
            return 0
        end = start + drop
        self.known_after = self.seqs[end - 1]
        if self.ttls:
            self.ttls -= sum(1 for e in itertools.islice(self.envelopes, start, end)
                             if e.ttl_seconds is not None)
        if end * 4 >= keep:
            # New lists once the dropped head is a quarter of the bound, so an
            # entry's lists hold at most 1.25 times it (windows handed out keep
            # the old ones, unchanged).
            self.seqs = self.seqs[end:]
            self.envelopes = self.envelopes[end:]
            end = 0
        self.start = end
        return drop


class RecentHistory:
    """Per-session recent history, bounded per session and in all (LRU by session)."""

    def __init__(self, *, per_session: int, total: int) -> None:
        self._per_session = per_session
        self._total_max = total
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_partition: dict[int, set[str]] = {}
        self._dseq: dict[int, int] = {}
        self._total = 0
        self.cold_reads = 0
        """Reads that went to the server (a gap, or a session not cached)."""

    @property
    def enabled(self) -> bool:
        """False when configured to keep nothing."""
        return self._per_session > 0 and self._total_max > 0

    @property
    def size(self) -> int:
        """Envelopes cached."""
        return self._total

    # -- intake -------------------------------------------------------------

    def observe(self, partition: int, dseq: int | None, seq: int, sid: str,
                envelope: Envelope | None) -> None:
        """Record one delivery pulled from ``partition`` (call for every delivery, in order)."""
        if not self.enabled:
            return
        self.observe_delivery(partition, dseq)
        entry = self._entries.get(sid)
        if entry is None:
            entry = self._entries[sid] = _Entry(partition, seq - 1)
            self._by_partition.setdefault(partition, set()).add(sid)
        elif seq <= entry.hi:
            return  # a redelivery of something seen
        else:
            self._entries.move_to_end(sid)
        entry.hi = seq
        if envelope is not None:
            entry.add(seq, envelope)
            self._total += 1
            self._total -= entry.trim(self._per_session)
            self._evict()

    def observe_delivery(self, partition: int, dseq: int | None) -> None:
        """Check one delivery's sequence: a step other than +1 drops the partition's sessions."""
        last = self._dseq.get(partition)
        if dseq is None or (last is not None and dseq != last + 1):
            self.drop_partition(partition)
        if dseq is not None:
            self._dseq[partition] = dseq

    def drop_partition(self, partition: int) -> None:
        """Forget the partition's sessions (it moved, or a delivery went unseen)."""
        self._dseq.pop(partition, None)
        for sid in self._by_partition.pop(partition, ()):
            entry = self._entries.pop(sid, None)
            if entry is not None:
                self._total -= len(entry)

    def drop(self, sid: str) -> None:
        """Forget one session."""
        entry = self._entries.pop(sid, None)
        if entry is not None:
            self._total -= len(entry)
            sids = self._by_partition.get(entry.partition)
            if sids is not None:
                sids.discard(sid)

    def _evict(self) -> None:
        while self._total > self._total_max and self._entries:
            sid = next(iter(self._entries))
            self.drop(sid)

    # -- reading ------------------------------------------------------------

    async def history(self, bus: SessionBus, sid: str, up_to: int,
                      last: int | None = None) -> History:
        """The session's envelopes stored up to stream sequence ``up_to``, in order.

        With ``last``, only the newest ``last`` of them: the stream is not
        read when the entry holds that many.
        """
        entry = self._entries.get(sid)
        if entry is None or entry.hi < up_to:
            self.cold_reads += 1
            return await read_up_to(bus, sid, up_to, last)
        # The entry holds everything in (known_after, hi]: take the window now,
        # before any await lets an intake trim it (the lists are append-only).
        start = entry.start
        tail = History(entry.envelopes, start, bisect.bisect_right(entry.seqs, up_to, start))
        if entry.ttls:
            now = time.time()
            tail = History([e for e in tail if not e.is_expired(now)])
        known_after = entry.known_after
        if known_after == 0 or (last is not None and len(tail) >= last):
            return tail.newest(last)
        self.cold_reads += 1
        # Up to the oldest envelope held (stored: the read waits for a replica
        # that is behind to reach it), which is then left out.
        anchor = min(entry.seqs[start], up_to) if len(entry.seqs) > start else up_to
        front = [(seq, e) for seq, e in await read_history(bus, sid, up_to=anchor,
                                                            must_reach=anchor)
                 if seq <= known_after]
        if known_after < up_to:
            self._adopt(sid, entry, known_after, front)
        now = time.time()
        return History([e for _, e in front if not e.is_expired(now)]
                       + [e for e in tail if not e.is_expired(now)]).newest(last)

    def _adopt(self, sid: str, entry: _Entry, known_after: int,
               front: list[tuple[int, Envelope]]) -> None:
        """Put what was read in front of the session's cached envelopes, if it fits."""
        if self._entries.get(sid) is not entry or entry.known_after != known_after:
            return  # dropped or filled meanwhile
        if len(front) + len(entry) > self._per_session:
            return  # past the bound: the front is read each time
        # New lists: windows handed out keep the old ones, unchanged.
        entry.seqs = [seq for seq, _ in front] + entry.seqs[entry.start:]
        entry.envelopes = [e for _, e in front] + entry.envelopes[entry.start:]
        entry.start = 0
        entry.ttls += sum(1 for _, e in front if e.ttl_seconds is not None)
        entry.known_after = 0
        self._total += len(front)
        self._evict()
