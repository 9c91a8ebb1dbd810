"""Delivery guarantees under real faults: kills, pauses, server restarts, cut links.

Each test runs one scenario of ``scenarios.py`` once (``bench/soak.py``
repeats them and prints the figures) and asserts what the README promises:
every envelope the server acked as stored completes a turn (0 lost), each
session's turns start in send order (only the envelope cut by the fault may
run again), no two turns of one session overlap in time (a paused worker's
stale turn: none of its effects stored after its successor's), nothing is
stored twice; duplicates (re-runs) are counted and printed. The figures are
printed with ``-s``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scenarios import (
    Outcome,
    cluster_leader_kill,
    kill_one_of_three_and_join,
    leaf_link_cut,
    only_worker_restart,
    sender_cut,
    server_restart,
    worker_paused,
)
from sessionbus.bus._loop import LOOP_ENV
from sessionbus.workers import WorkerConfig
from worker_proc import FAST

pytestmark = pytest.mark.faults


def assert_guarantees(outcome: Outcome) -> None:
    print(f"\n{outcome.line()}")
    r = outcome.report
    assert outcome.finished, f"not every acked envelope was handled in time\n{outcome.problems()}"
    assert r.lost == 0, outcome.problems()
    assert r.reordered == 0, outcome.problems()
    assert r.overlaps == 0, outcome.problems()
    assert r.stale_effects == 0, outcome.problems()
    assert r.stored_duplicates == 0, outcome.problems()
    assert r.acked > 0 and r.turns >= r.acked
    assert not outcome.failures, outcome.problems()


@pytest.mark.timeout(150)
async def test_only_worker_killed_mid_turn_restarted_with_a_new_id(tmp_path: Path) -> None:
    outcome = await only_worker_restart(tmp_path, same_id=False)
    assert_guarantees(outcome)
    assert outcome.report.failover is not None
    assert outcome.report.failover <= WorkerConfig().failover_bound + 3.0


@pytest.mark.timeout(150)
async def test_only_worker_killed_mid_turn_restarted_with_the_same_id(tmp_path: Path) -> None:
    outcome = await only_worker_restart(tmp_path, same_id=True)
    assert_guarantees(outcome)
    assert outcome.report.failover is not None
    assert outcome.report.failover <= WorkerConfig().failover_bound + 3.0


@pytest.mark.timeout(150)
async def test_one_of_three_workers_killed_then_one_joins_under_load(tmp_path: Path) -> None:
    outcome = await kill_one_of_three_and_join(tmp_path)
    assert_guarantees(outcome)
    assert outcome.report.failover is not None
    assert outcome.report.failover <= FAST.failover_bound + 3.0


@pytest.mark.timeout(150)
async def test_nats_server_killed_and_restarted_on_its_data_dir_twice(tmp_path: Path) -> None:
    outcome = await server_restart(tmp_path, cycles=2)
    assert_guarantees(outcome)


@pytest.mark.timeout(150)
async def test_stream_leader_of_an_r3_cluster_killed_and_restarted(tmp_path: Path) -> None:
    outcome = await cluster_leader_kill(tmp_path)
    assert_guarantees(outcome)


@pytest.mark.timeout(150)
async def test_leaf_link_cut_past_the_failover_bound_and_restored(tmp_path: Path) -> None:
    outcome = await leaf_link_cut(tmp_path)
    assert_guarantees(outcome)


@pytest.mark.timeout(150)
async def test_worker_paused_past_the_failover_bound_then_resumed(tmp_path: Path) -> None:
    outcome = await worker_paused(tmp_path)
    assert_guarantees(outcome)
    assert outcome.report.reply_duplicates == 0, outcome.problems()


@pytest.mark.timeout(150)
async def test_sender_cut_mid_send_retries_with_its_idempotency_key(tmp_path: Path) -> None:
    outcome = await sender_cut(tmp_path)
    assert_guarantees(outcome)


@pytest.mark.timeout(150)
async def test_nats_server_restarted_under_workers_on_uvloop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop ``sessionbus worker`` runs on where uvloop is installed: the same guarantees."""
    pytest.importorskip("uvloop", reason="uvloop is not installed (pip install 'sessionbus[fast]')")
    monkeypatch.setenv(LOOP_ENV, "uvloop")
    outcome = await server_restart(tmp_path, cycles=1)
    assert_guarantees(outcome)
    assert _loops_named(tmp_path) == {"event loop: uvloop"}


def _loops_named(tmp: Path) -> set[str]:
    """The event loops the run's worker processes named first on their output."""
    return {path.read_text().splitlines()[0] for path in tmp.glob("w*.err")}
