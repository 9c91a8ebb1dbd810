"""What ``sessionbus demo`` measures and checks, kept apart from how it drives the run.

A :class:`Tally` receives the send time of every envelope and the
:class:`~sessionbus._demo_agent.TurnRecord` of every turn the workers ran. From them
it derives the figures (turns/s, latency percentiles, redeliveries) and the
verdict: every envelope handled, each session's envelopes handled in send
order (a redelivered envelope may repeat right after itself, never after a
later one), and no two turns of one session overlapping in time.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from sessionbus._demo_agent import TurnRecord

__all__ = ["CLOCK_TOLERANCE", "Tally", "Verdict", "percentile"]

#: Slack when comparing turn start and end times taken by different processes.
CLOCK_TOLERANCE = 0.002


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The demo's checks: ``ok`` only if every one of them held."""

    sessions: int
    in_order: int
    overlapping: int
    missing: int
    examples: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Every envelope handled, in order, one turn at a time per session."""
        return self.in_order == self.sessions and not self.overlapping and not self.missing


@dataclass
class Tally:
    """Send times and turn records of one demo run."""

    envelopes_per_session: int
    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)
    done_at: dict[tuple[str, int], float] = field(default_factory=dict)
    records: dict[str, list[TurnRecord]] = field(default_factory=dict)
    turns: int = 0
    redelivered: int = 0
    first_sent: float | None = None
    last_done: float | None = None

    def sent(self, session_id: str, index: int) -> None:
        """Note that envelope ``index`` of ``session_id`` is being sent now."""
        now = time.monotonic()
        self.sent_at[(session_id, index)] = now
        if self.first_sent is None:
            self.first_sent = now

    def record(self, record: TurnRecord) -> None:
        """Take a turn record from a worker."""
        now = time.monotonic()
        self.turns += 1
        if record.attempt > 1:
            self.redelivered += 1
        self.records.setdefault(record.session_id, []).append(record)
        key = (record.session_id, record.index)
        if key not in self.done_at:
            self.done_at[key] = now
            self.last_done = now

    @property
    def handled(self) -> int:
        """Distinct envelopes handled at least once."""
        return len(self.done_at)

    @property
    def repeated(self) -> int:
        """Turns that handled an envelope again (at-least-once at work)."""
        return self.turns - self.handled

    def elapsed(self) -> float:
        """Seconds from the first send to the last first-time completion."""
        if self.first_sent is None or self.last_done is None:
            return 0.0
        return max(self.last_done - self.first_sent, 1e-9)

    def turns_per_second(self) -> float:
        """Turns run per second over :meth:`elapsed`."""
        elapsed = self.elapsed()
        return self.turns / elapsed if elapsed else 0.0

    def latencies(self) -> list[float]:
        """Seconds from each envelope's send to its first completion being seen."""
        return [done - self.sent_at[key] for key, done in self.done_at.items()
                if key in self.sent_at]

    def verdict(self, session_ids: list[str]) -> Verdict:
        """Check order, overlap and completeness for every session."""
        expected = list(range(self.envelopes_per_session))
        in_order = overlapping = missing = 0
        examples: list[str] = []
        for sid in session_ids:
            records = sorted(self.records.get(sid, []), key=lambda r: (r.started, r.ended))
            handled = {r.index for r in records}
            missing += sum(1 for i in expected if i not in handled)
            # A redelivery repeats an envelope right after itself; anything
            # else out of sequence is an order violation.
            order = [i for i, _ in itertools.groupby(r.index for r in records)]
            if order == [i for i in expected if i in handled]:
                in_order += 1
            elif len(examples) < 3:
                examples.append(f"{sid}: handled order {order[:16]}")
            for a, b in itertools.pairwise(records):
                if b.started < a.ended - CLOCK_TOLERANCE:
                    overlapping += 1
                    if len(examples) < 3:
                        examples.append(f"{sid}: turns {a.index} ({a.worker_id}) and "
                                        f"{b.index} ({b.worker_id}) overlapped")
                    break
        return Verdict(len(session_ids), in_order, overlapping, missing, tuple(examples))
