"""The fault suite's checker catches each violation, on hand-made histories.

The scenarios are only as good as their judge: each test below feeds the
recorder a history with one known violation (or a clean one with the
at-least-once re-runs the guarantees allow) and checks what it reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from recorder import Ack, Stored, TurnRun, check, read_acks, read_turns


def acks(sid: str, n: int, at: float = 0.0) -> list[Ack]:
    return [Ack(sid=sid, idx=i, sent=at, acked=at) for i in range(n)]


def turn(idx: int, worker: str, start: float, end: float | None, sid: str = "s",
         **kw: object) -> TurnRun:
    return TurnRun(sid=sid, idx=idx, worker=worker, start=start, end=end, **kw)  # type: ignore[arg-type]


def test_clean_history_with_the_cut_envelope_rerun_is_ok() -> None:
    turns = [turn(0, "w0", 1, 2), turn(1, "w0", 2, 3), turn(2, "w0", 3, None),
             turn(2, "w1", 9, 10), turn(3, "w1", 10, 11)]
    report = check(acks("s", 4), turns, kills={"w0": [3.5]}, fault_at=3.5)
    assert report.ok, report.summary()
    assert (report.lost, report.reordered, report.overlaps) == (0, 0, 0)
    assert report.duplicates == 1 and report.duplicates_completed == 0
    assert report.failover == 9 - 3.5
    assert report.longest_stall == 9 - 3  # envelope 2's wait, from 1's end to its re-run


def test_the_issue_order_break_is_reported() -> None:
    # Issue 9, finding 1: 0@w0 1@w0 2@w0(cut) 3@w1 2@w1 3@w1 4@w1
    turns = [turn(0, "w0", 1, 2), turn(1, "w0", 2, 3), turn(2, "w0", 3, None),
             turn(3, "w1", 10, 11), turn(2, "w1", 11, 12), turn(3, "w1", 12, 13),
             turn(4, "w1", 13, 14)]
    report = check(acks("s", 5), turns, kills={"w0": [3.5]})
    assert report.reordered == 1 and report.reordered_reruns == 0 and not report.ok
    assert "0@w0 1@w0 2@w0(cut) 3@w1 2@w1 3@w1 4@w1" in report.problems[0]
    assert report.duplicates == 2 and report.duplicates_completed == 1


def test_a_completed_envelope_rerun_after_its_successor_started_is_a_reorder() -> None:
    # 1 completed, its ack was lost with the worker while 2 had started
    turns = [turn(0, "w0", 1, 2), turn(1, "w0", 2, 3), turn(2, "w0", 3, None),
             turn(1, "w1", 10, 11), turn(2, "w1", 11, 12)]
    report = check(acks("s", 3), turns, kills={"w0": [3.01]})
    assert report.reordered == 1 and report.reordered_reruns == 1 and not report.ok


def test_a_skipped_envelope_is_a_reorder() -> None:
    turns = [turn(0, "w", 1, 2), turn(2, "w", 2, 3), turn(1, "w", 3, 4)]
    report = check(acks("s", 3), turns)
    assert report.reordered == 2


def test_an_acked_envelope_that_never_ran_is_lost() -> None:
    turns = [turn(0, "w", 1, 2), turn(1, "w", 2, 3)]
    report = check(acks("s", 3), turns)
    assert report.lost == 1 and "s#2" in report.problems[0]
    # a cut or cancelled run does not count as ran
    cut = check(acks("s", 1), [turn(0, "w", 1, None)], kills={"w": [1.5]})
    cancelled = check(acks("s", 1), [turn(0, "w", 1, 2, cancelled=True)])
    assert cut.lost == 1 and cancelled.lost == 1


def test_overlapping_turns_of_one_session_are_reported() -> None:
    turns = [turn(0, "w1", 1, 5), turn(1, "w2", 4, 6), turn(0, "w1", 1, 2, sid="t"),
             turn(1, "w2", 3, 4, sid="t")]
    report = check(acks("s", 2) + acks("t", 2), turns)
    assert report.overlaps == 1 and "s 0@w1" in report.problems[0]


def test_a_cut_turn_runs_until_its_worker_was_killed() -> None:
    turns = [turn(0, "w1", 1, None), turn(0, "w2", 4, 5)]
    assert check(acks("s", 1), turns, kills={"w1": [3]}).overlaps == 0
    assert check(acks("s", 1), turns, kills={"w1": [4.5]}).overlaps == 1
    assert check(acks("s", 1), turns).overlaps == 1  # never killed: still running


def test_a_paused_workers_stale_turn_is_judged_by_its_effects() -> None:
    turns = [turn(0, "w1", 1, 2), turn(1, "w1", 2, 20), turn(1, "w2", 9, 10),
             turn(2, "w2", 10, 11)]
    pauses = {"w1": [(2.5, 19.5)]}
    clean = [Stored("s", 1, idx=0), Stored("s", 2, idx=1), Stored("s", 3, idx=2),
             Stored("s", 4, reply_to=0), Stored("s", 5, reply_to=1), Stored("s", 6, reply_to=2)]
    report = check(acks("s", 3), turns, pauses=pauses, stored=clean)
    assert report.ok and report.overlaps == 0, report.summary()
    # the stale turn's reply lands after its successor's
    late = [*clean, Stored("s", 7, reply_to=1, worker="w1")]
    report = check(acks("s", 3), turns, pauses=pauses, stored=late)
    assert report.stale_effects == 1 and report.reply_duplicates == 1 and not report.ok
    # without the pause window, the same turns overlap in time
    assert check(acks("s", 3), turns).overlaps == 2


def test_an_envelope_stored_twice_is_reported() -> None:
    stored = [Stored("s", 1, idx=0), Stored("s", 2, idx=1), Stored("s", 3, idx=1)]
    report = check(acks("s", 2), [turn(0, "w", 1, 2), turn(1, "w", 2, 3)], stored=stored)
    assert report.stored_duplicates == 1 and not report.ok


def test_logs_are_read_back_into_turns_and_acks(tmp_path: Path) -> None:
    log = tmp_path / "w.jsonl"
    base = {"sid": "s", "worker": "w", "attempt": 1}
    lines = [
        {"ev": "start", "t": 1.0, "seq": 1, "idx": 0, **base},
        {"start": 1.0, "end": 2.0, "seq": 1, "idx": 0, **base},
        {"ev": "start", "t": 2.0, "seq": 2, "idx": 1, **base},
        {"ev": "cancel", "t": 2.5, "seq": 2, "idx": 1, **base},
        {"ev": "start", "t": 3.0, "seq": 3, "idx": 2, **base},
    ]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn')
    turns = sorted(read_turns([str(log)]), key=lambda t: t.start)
    assert [(t.idx, t.end, t.cancelled) for t in turns] == [
        (0, 2.0, False), (1, 2.5, True), (2, None, False)]
    sent = tmp_path / "sender.jsonl"
    sent.write_text(json.dumps({"ev": "ack", "sid": "s", "idx": 0, "sent": 0.5, "t": 0.6,
                                "attempts": 2}) + "\n" + json.dumps({"ev": "done"}) + "\n")
    assert read_acks(str(sent)) == [Ack("s", 0, 0.5, 0.6, 2)]
