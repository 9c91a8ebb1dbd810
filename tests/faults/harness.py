"""Process drivers for the fault suite: workers, a sender, and what they logged.

A :class:`Run` owns every process one scenario starts (worker processes from
``tests/worker_proc.py``, one sender from ``tests/faults/sender_proc.py``),
their logs under one directory, and the faults it injected (kill times,
pause windows). It stops every process by its PID in :meth:`Run.close`.
Nothing here sleeps to synchronise: waits poll the logs (or the workers
bucket) for the state they need, within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recorder import Ack, Report, Stored, TurnRun, check, read_acks, read_turns
from sessionbus.bus import SessionBus
from sessionbus.schemas import Envelope, decode
from sessionbus.workers._membership import Lease

HERE = Path(__file__).resolve().parent
WORKER_SCRIPT = str(HERE.parent / "worker_proc.py")
SENDER_SCRIPT = str(HERE / "sender_proc.py")
GROUP = "g"


class Timeout(AssertionError):
    """A wait in a scenario ran past its bound."""


@dataclass
class Run:
    """The processes, logs and injected faults of one scenario run."""

    tmp: Path
    prefix: str = "f"
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    kills: dict[str, list[float]] = field(default_factory=dict)
    pauses: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    sender: subprocess.Popen[bytes] | None = None
    faults: list[tuple[str, float]] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)

    # -- processes ---------------------------------------------------------

    def spawn_worker(self, worker_id: str, url: str, *, timings: str = "fast",
                     sleep: float = 0.0, reply: bool = False, domain: str = "",
                     concurrency: int = 64) -> None:
        """Start a worker process of group ``g`` logging turn starts and ends."""
        n = self.incarnations.get(worker_id, 0) + 1
        self.incarnations[worker_id] = n
        log = str(self.tmp / f"{worker_id}.{n}.jsonl")
        self.logs.append(log)
        cmd = [sys.executable, WORKER_SCRIPT, "--url", url, "--prefix", self.prefix,
               "--group", GROUP, "--worker-id", worker_id, "--log", log, "--log-starts",
               "--timings", timings, "--sleep", str(sleep), "--concurrency", str(concurrency)]
        if reply:
            cmd.append("--reply")
        if domain:
            cmd += ["--domain", domain]
        with open(self.tmp / f"{worker_id}.{n}.err", "wb") as err:
            self.workers[worker_id] = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)

    def spawn_sender(self, url: str, *, sessions: int, per_session: int, pause: float = 0.0,
                     timeout: float = 1.0, deadline: float = 60.0, domain: str = "") -> None:
        """Start the sender process."""
        cmd = [sys.executable, SENDER_SCRIPT, "--url", url, "--prefix", self.prefix,
               "--sessions", str(sessions), "--per-session", str(per_session),
               "--pause", str(pause), "--timeout", str(timeout), "--deadline", str(deadline),
               "--log", str(self.tmp / "sender.jsonl")]
        if domain:
            cmd += ["--domain", domain]
        with open(self.tmp / "sender.err", "wb") as err:
            self.sender = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)

    def kill(self, worker_id: str) -> float:
        """SIGKILL a worker; returns the time of the kill."""
        proc = self.workers[worker_id]
        at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.killed_pids.add(proc.pid)
        self.kills.setdefault(worker_id, []).append(at)
        self.faults.append((f"kill {worker_id}", at))
        return at

    def pause(self, worker_id: str) -> float:
        """SIGSTOP a worker; returns the time."""
        at = time.time()
        os.kill(self.workers[worker_id].pid, signal.SIGSTOP)
        self.pauses.setdefault(worker_id, []).append((at, float("inf")))
        self.faults.append((f"stop {worker_id}", at))
        return at

    def resume(self, worker_id: str) -> float:
        """SIGCONT a paused worker; returns the time."""
        at = time.time()
        os.kill(self.workers[worker_id].pid, signal.SIGCONT)
        since, _ = self.pauses[worker_id][-1]
        self.pauses[worker_id][-1] = (since, at)
        return at

    def check_alive(self) -> None:
        """Raise if a worker or the sender died on its own."""
        for wid, proc in self.workers.items():
            code = proc.poll()
            if code is not None and proc.pid not in self.killed_pids:
                raise AssertionError(f"worker {wid} exited with {code}\n{self.errors()}")
        if self.sender is not None:
            code = self.sender.poll()
            if code not in (None, 0):
                raise AssertionError(f"sender exited with {code}\n{self.errors()}")

    def stop_workers(self, within: float = 20.0) -> None:
        """SIGTERM (drain) every live worker, SIGKILL what is left after ``within``."""
        live = [p for p in self.workers.values() if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def close(self) -> None:
        """SIGKILL every process still running (by PID)."""
        procs = list(self.workers.values()) + ([self.sender] if self.sender else [])
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def errors(self, tail: int = 2500) -> str:
        """The tail of every process's stderr."""
        out = []
        for path in sorted(self.tmp.glob("*.err")):
            text = path.read_text(errors="replace")[-tail:]
            if text.strip():
                out.append(f"--- {path.name}\n{text}")
        return "\n".join(out)

    # -- logs --------------------------------------------------------------

    def acks(self) -> list[Ack]:
        """Envelopes the sender saw acked."""
        return read_acks(str(self.tmp / "sender.jsonl"))

    def turns(self) -> list[TurnRun]:
        """Every turn the workers logged."""
        return read_turns(self.logs)

    def sender_done(self) -> bool:
        """Whether the sender logged its end."""
        path = self.tmp / "sender.jsonl"
        return path.exists() and b'"ev": "done"' in path.read_bytes()

    def completed(self) -> set[tuple[str, int]]:
        """(session, index) of every turn that completed."""
        return {(t.sid, t.idx) for t in self.turns() if t.end is not None and not t.cancelled}

    def ended_count(self) -> int:
        """Turns completed so far, counting re-runs."""
        return sum(1 for t in self.turns() if t.end is not None and not t.cancelled)

    async def wait_for(self, what: str, ok: Callable[[], bool], within: float) -> None:
        """Poll ``ok`` every 50 ms until true; raise :class:`Timeout` after ``within``."""
        deadline = time.monotonic() + within
        while not ok():
            self.check_alive()
            if time.monotonic() > deadline:
                raise Timeout(f"{what}: not within {within}s\n{self.errors()}")
            await asyncio.sleep(0.05)

    async def wait_all_done(self, within: float) -> bool:
        """Wait for the sender to finish and every acked envelope to complete a turn."""
        def done() -> bool:
            if not self.sender_done():
                return False
            return {(a.sid, a.idx) for a in self.acks()} <= self.completed()
        try:
            await self.wait_for("all acked envelopes handled", done, within)
        except Timeout:
            return False
        return True

    def report(self, *, stored: list[Stored] | None = None, fault_at: float | None = None,
               now: float | None = None) -> Report:
        """Check what was logged (see :func:`recorder.check`)."""
        return check(self.acks(), self.turns(), kills=self.kills, pauses=self.pauses,
                     stored=stored, fault_at=fault_at, now=now)


async def read_stored(sb: SessionBus) -> list[Stored]:
    """Every message of the envelope stream, in stream order."""
    stream = sb.names.envelope_stream
    info = await sb.js.stream_info(stream)
    total = info.state.messages
    out: list[Stored] = []
    if not total:
        return out
    sub = await sb.js.subscribe(f"{sb.names.prefix}.p.>", stream=stream, ordered_consumer=True)
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            env = decode(msg.data, Envelope)
            data = env.event_data or {}
            seq = msg.metadata.sequence.stream
            if "reply_to" in data:
                out.append(Stored(sid=env.session_id, seq=seq, reply_to=int(data["reply_to"]),
                                  worker=str(data.get("worker", ""))))
            elif "idx" in data:
                out.append(Stored(sid=env.session_id, seq=seq, idx=int(data["idx"])))
    finally:
        await sub.unsubscribe()
    return out


async def group_members(sb: SessionBus) -> dict[str, Lease]:
    """The group's live leases, by worker id."""
    entries = await sb.workers_kv.list(sb.names.worker_group_filter(GROUP))
    return {lease.worker_id: lease for lease in (Lease.decode(e.value) for e in entries)}


async def wait_members(sb: SessionBus, run: Run, members: set[str], *, claimed: int,
                       within: float = 30.0) -> None:
    """Wait until exactly ``members`` hold leases claiming ``claimed`` partitions in all."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(Exception):
            current = await group_members(sb)
            if set(current) == members and sum(len(x.claims) for x in current.values()) == claimed:
                return
        run.check_alive()
        if time.monotonic() > deadline:
            raise Timeout(f"group never settled on {sorted(members)}\n{run.errors()}")
        await asyncio.sleep(0.1)
