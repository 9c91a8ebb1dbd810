"""The fault suite's judge: what the processes logged, checked against the guarantees.

Inputs are plain records, so the checker can be tested on hand-made (and
deliberately broken) histories:

* :class:`Ack`: the sender's log of every envelope the server acked as
  stored (session, index within the session, time of the first attempt and
  of the ack, attempts);
* :class:`TurnRun`: a worker's log of one turn, from its start line to its
  end line (``end`` is None for a turn cut by a kill, ``cancelled`` when
  the runtime cancelled it);
* the times each worker process was killed, and the pause windows of
  workers that were SIGSTOPped;
* optionally, what the envelope stream holds at the end (:class:`Stored`).

:func:`check` returns a :class:`Report` with the figures the soak form
prints (lost, reordered, overlaps, duplicates, longest stall, failover)
and a readable line for each violation.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ack", "Report", "Stored", "TurnRun", "check", "read_acks", "read_turns"]

#: Violations of each kind listed in full per report; the counts are always complete.
_MAX_LISTED = 10


@dataclass(frozen=True, slots=True)
class Ack:
    """An envelope the server acked as stored, as the sender logged it."""

    sid: str
    idx: int
    sent: float
    acked: float
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class TurnRun:
    """One turn as a worker logged it; ``end`` None: cut (no end line)."""

    sid: str
    idx: int
    worker: str
    start: float
    end: float | None
    seq: int = 0
    attempt: int = 1
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Stored:
    """One message of the envelope stream at the end of a run, in stream order."""

    sid: str
    seq: int
    idx: int | None = None  # a client envelope's index
    reply_to: int | None = None  # a reply's causing index
    worker: str = ""


@dataclass
class Report:
    """What a run did, and every violation of the delivery guarantees found."""

    acked: int = 0
    turns: int = 0
    lost: int = 0
    reordered: int = 0
    reordered_reruns: int = 0
    overlaps: int = 0
    stale_effects: int = 0
    duplicates: int = 0
    duplicates_completed: int = 0
    stored_duplicates: int = 0
    reply_duplicates: int = 0
    retried_sends: int = 0
    longest_stall: float = 0.0
    failover: float | None = None
    problems: list[str] = field(default_factory=list)
    _listed: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """0 lost, 0 reordered, 0 overlaps, no stale effect, nothing stored twice."""
        return not (self.lost or self.reordered or self.overlaps or self.stale_effects
                    or self.stored_duplicates)

    def note(self, text: str) -> None:
        """Keep a violation's description (the first few of each kind are kept)."""
        kind = text.split(":", 1)[0]
        self._listed[kind] = self._listed.get(kind, 0) + 1
        if self._listed[kind] <= _MAX_LISTED:
            self.problems.append(text)

    def figures(self) -> dict[str, float | int | None]:
        """The figures the soak form prints."""
        return {
            "lost": self.lost, "reordered": self.reordered,
            "rerun_after_next": self.reordered_reruns, "overlaps": self.overlaps,
            "stale": self.stale_effects, "dups": self.duplicates,
            "dups_done": self.duplicates_completed, "stored_dups": self.stored_duplicates,
            "reply_dups": self.reply_duplicates, "retried": self.retried_sends,
            "stall": round(self.longest_stall, 3),
            "failover": None if self.failover is None else round(self.failover, 3),
        }

    def summary(self) -> str:
        """One line of figures, then the listed violations."""
        figs = " ".join(f"{k}={v}" for k, v in self.figures().items())
        head = f"{self.acked} acked, {self.turns} turns: {figs}"
        return "\n".join([head, *self.problems])


def check(
    acks: Iterable[Ack],
    turns: Iterable[TurnRun],
    *,
    kills: Mapping[str, Sequence[float]] | None = None,
    pauses: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    stored: Sequence[Stored] | None = None,
    fault_at: float | None = None,
    now: float | None = None,
) -> Report:
    """Check a run: 0 lost, per-session order, no overlapping turns, duplicates counted.

    * **lost**: an acked envelope without a completed turn.
    * **reordered**: in a session, ordered by start time, a turn whose index
      is below the highest index already started, or skips past the next
      one; a re-run of the latest index (the one that was cut, or whose ack
      was lost) is a duplicate, not a reorder. ``reordered_reruns`` counts
      the reorders that are a completed envelope run again after its
      successor started (its ack lost with its worker).
    * **overlaps**: a turn starting before an earlier turn of the session
      ended; a cut turn ends when its worker was killed. Turns running
      while their worker was paused are judged by their effects instead
      (``stale_effects``): in ``stored``, a session's replies must name
      strictly increasing causing indexes, so no late reply of a stale turn
      lands after its successor's (nor twice).
    * **duplicates**: turn starts beyond the first per envelope
      (``duplicates_completed``: completed runs beyond the first).
    * **longest stall**: the longest an envelope waited, once it was acked
      and its predecessor in the session had completed, for the start of
      the run that completed it.
    * **failover**: with ``fault_at``, the longest stall of an envelope
      started after the fault, counted from the fault at the earliest.
    """
    acks = list(acks)
    turns = list(turns)
    kills = kills or {}
    pauses = pauses or {}
    report = Report(acked=len(acks), turns=len(turns))
    report.retried_sends = sum(1 for a in acks if a.attempts > 1)
    by_session: dict[str, list[TurnRun]] = defaultdict(list)
    for t in turns:
        by_session[t.sid].append(t)
    for runs in by_session.values():
        runs.sort(key=lambda t: (t.start, t.end if t.end is not None else math.inf))

    completed: dict[tuple[str, int], float] = {}
    began: dict[tuple[str, int], float] = {}  # start of the first run that completed
    starts: dict[tuple[str, int], int] = defaultdict(int)
    for t in turns:
        key = (t.sid, t.idx)
        starts[key] += 1
        if t.end is not None and not t.cancelled and t.end < completed.get(key, math.inf):
            completed[key] = t.end
            began[key] = t.start
    report.duplicates = sum(n - 1 for n in starts.values())
    done_runs: dict[tuple[str, int], int] = defaultdict(int)
    for t in turns:
        if t.end is not None and not t.cancelled:
            done_runs[(t.sid, t.idx)] += 1
    report.duplicates_completed = sum(n - 1 for n in done_runs.values())

    _check_lost(report, acks, completed)
    for sid, runs in sorted(by_session.items()):
        _check_order(report, sid, runs)
        _check_overlap(report, sid, runs, kills, pauses)
    if stored is not None:
        _check_stored(report, stored)
    end_of_run = now if now is not None else max(
        [a.acked for a in acks] + [t.end or t.start for t in turns] + [0.0])
    report.longest_stall = _longest_stall(acks, completed, began, end_of_run)
    if fault_at is not None:
        report.failover = _failover(acks, completed, began, fault_at, end_of_run)
    return report


def _check_lost(report: Report, acks: list[Ack], completed: dict[tuple[str, int], float]) -> None:
    for a in sorted(acks, key=lambda a: (a.sid, a.idx)):
        if (a.sid, a.idx) not in completed:
            report.lost += 1
            report.note(f"lost: {a.sid}#{a.idx} acked at {a.acked:.3f} never completed a turn")


def _fmt(t: TurnRun) -> str:
    tail = "(cut)" if t.end is None else "(cancelled)" if t.cancelled else ""
    return f"{t.idx}@{t.worker}{tail}"


def _check_order(report: Report, sid: str, runs: list[TurnRun]) -> None:
    high = -1
    bad = False
    for t in runs:
        if t.idx == high + 1:
            high = t.idx
        elif t.idx == high:
            pass  # a re-run of the latest envelope: counted as a duplicate
        else:
            report.reordered += 1
            if t.idx < high and any(r.idx == t.idx and r.end is not None and not r.cancelled
                                    and r.end <= t.start for r in runs):
                report.reordered_reruns += 1
            bad = True
            high = max(high, t.idx)
    if bad:
        report.note(f"reordered: {sid} turns in start order " + " ".join(_fmt(t) for t in runs))


def _effective_end(t: TurnRun, kills: Mapping[str, Sequence[float]]) -> float:
    if t.end is not None:
        return t.end
    after = [k for k in kills.get(t.worker, ()) if k >= t.start]
    return min(after) if after else math.inf


def _stale(t: TurnRun, pauses: Mapping[str, Sequence[tuple[float, float]]]) -> bool:
    """Whether the turn was running while its worker was paused."""
    end = t.end if t.end is not None else math.inf
    return any(t.start <= until and end >= since for since, until in pauses.get(t.worker, ()))


def _check_overlap(report: Report, sid: str, runs: list[TurnRun],
                   kills: Mapping[str, Sequence[float]],
                   pauses: Mapping[str, Sequence[tuple[float, float]]]) -> None:
    latest: TurnRun | None = None
    latest_end = -math.inf
    for t in runs:
        if _stale(t, pauses):
            continue
        if latest is not None and t.start < latest_end:
            report.overlaps += 1
            report.note(f"overlap: {sid} {_fmt(latest)} [{latest.start:.3f}, {latest_end:.3f}] "
                        f"still running when {_fmt(t)} started at {t.start:.3f}")
        end = _effective_end(t, kills)
        if end > latest_end:
            latest, latest_end = t, end


def _check_stored(report: Report, stored: Sequence[Stored]) -> None:
    envelopes: dict[tuple[str, int], int] = defaultdict(int)
    replies: dict[str, list[Stored]] = defaultdict(list)
    for m in stored:
        if m.idx is not None:
            envelopes[(m.sid, m.idx)] += 1
        elif m.reply_to is not None:
            replies[m.sid].append(m)
    for (sid, idx), n in sorted(envelopes.items()):
        if n > 1:
            report.stored_duplicates += n - 1
            report.note(f"stored twice: {sid}#{idx} is in the stream {n} times")
    for sid, msgs in sorted(replies.items()):
        msgs.sort(key=lambda m: m.seq)
        seen: set[int] = set()
        high = -1
        for m in msgs:
            assert m.reply_to is not None
            if m.reply_to in seen:
                report.reply_duplicates += 1
            if m.reply_to <= high:
                report.stale_effects += 1
                report.note(f"stale effect: {sid} reply to #{m.reply_to} from {m.worker} "
                            f"stored at seq {m.seq} after the reply to #{high}")
            seen.add(m.reply_to)
            high = max(high, m.reply_to)


def _longest_stall(acks: list[Ack], completed: dict[tuple[str, int], float],
                   began: dict[tuple[str, int], float], end_of_run: float) -> float:
    acked_at = {(a.sid, a.idx): a.acked for a in acks}
    longest = 0.0
    for (sid, idx), at in acked_at.items():
        ready = at
        if idx > 0:
            ready = max(ready, completed.get((sid, idx - 1), math.inf))
        if ready == math.inf:
            continue  # its predecessor never completed: counted as lost there
        longest = max(longest, began.get((sid, idx), end_of_run) - ready)
    return longest


def _failover(acks: list[Ack], completed: dict[tuple[str, int], float],
              began: dict[tuple[str, int], float], fault_at: float,
              end_of_run: float) -> float | None:
    """Longest wait, counted from the fault at the earliest, of an envelope started after it."""
    longest: float | None = None
    for a in acks:
        key = (a.sid, a.idx)
        ready = a.acked
        if a.idx > 0:
            ready = max(ready, completed.get((a.sid, a.idx - 1), math.inf))
        start = began.get(key, end_of_run)
        if ready == math.inf or start <= fault_at:
            continue
        wait = start - max(ready, fault_at)
        longest = wait if longest is None else max(longest, wait)
    return longest


def _lines(path: str) -> Iterable[dict[str, Any]]:
    """Complete JSON lines of a log (a torn last line of a killed process is skipped)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def read_turns(paths: Iterable[str]) -> list[TurnRun]:
    """Turns from worker logs written with ``--log-starts`` (see ``tests/worker_proc.py``)."""
    out: list[TurnRun] = []
    for path in paths:
        opened: dict[tuple[Any, ...], dict[str, Any]] = {}
        for d in _lines(path):
            key = (d["worker"], d["sid"], d["seq"], d["attempt"])
            ev = d.get("ev")
            if ev == "start":
                opened[key] = d
            elif ev == "cancel":
                s = opened.pop(key, None)
                if s is not None:
                    out.append(_turn(s, end=float(d["t"]), cancelled=True))
            elif ev is None:
                opened.pop(key, None)
                out.append(_turn(d, end=float(d["end"])))
        out.extend(_turn(s, end=None) for s in opened.values())
    return out


def _turn(d: dict[str, Any], *, end: float | None, cancelled: bool = False) -> TurnRun:
    start = d["t"] if "t" in d else d["start"]
    return TurnRun(sid=str(d["sid"]), idx=int(d["idx"]), worker=str(d["worker"]),
                   start=float(start), end=end, seq=int(d["seq"]),
                   attempt=int(d["attempt"]), cancelled=cancelled)


def read_acks(path: str) -> list[Ack]:
    """Acked sends from a sender log (see ``tests/faults/sender_proc.py``)."""
    return [Ack(sid=str(d["sid"]), idx=int(d["idx"]), sent=float(d["sent"]),
                acked=float(d["t"]), attempts=int(d["attempts"]))
            for d in _lines(path) if d.get("ev") == "ack"]
