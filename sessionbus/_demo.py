"""``sessionbus demo``: the whole bus at work in well under a minute, on one machine.

It starts an embedded nats-server (JetStream, data in a temporary
directory) unless ``--url``/``SESSIONBUS_URL`` names one, then:

1. starts ``--workers`` worker processes (``sessionbus worker
   sessionbus._demo_agent:handle --group demo``) with fast failover timings;
2. opens ``--sessions`` sessions and sends ``--envelopes`` envelopes into
   each, round by round, paced over a few seconds;
3. part-way, kills one worker with SIGKILL and starts it again: its
   sessions move to the other workers, and what it had not acked is
   redelivered;
4. closes every session once all envelopes were handled, stops the
   workers, and prints a summary: sessions, envelopes, turns/s, latency
   p50/p99 from send to turn done, redeliveries, and whether each
   session's envelopes were handled in send order, one turn at a time.

The exit code is 0 only if every envelope was handled and the order held.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from sessionbus._cli_common import Commands, add_command, checked_id, open_bus
from sessionbus._demo_agent import DEMO_EVENT, DEMO_GROUP, TurnRecord, demo_event_data
from sessionbus._demo_report import Tally, Verdict, percentile
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusError, BusTimeout, ConfigError, WorkerError, nats_errors
from sessionbus.bus.session import Session
from sessionbus.bus.settings import URL_ENV

__all__ = ["DEMO_WORKER_TIMINGS", "add_parser", "run_demo"]

#: Worker timings of the demo: a killed worker's sessions move within ~6 s.
DEMO_WORKER_TIMINGS = {"lease_ttl": 2.0, "ack_wait": 1.0, "poll_interval": 0.5,
                       "priority_timeout": 2.5, "drain_timeout": 5.0}
#: Who the demo sends as.
CLIENT = "demo-client"
_PROGRESS_TTY = 0.5
_PROGRESS_PLAIN = 2.0
_PARALLEL = 64


def add_parser(commands: Commands) -> None:
    """Register ``demo``."""
    p = add_command(
        commands, "demo", help="run the live demo: workers, sessions, a worker crash, a summary",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sessions", type=int, default=200, help="sessions (default: %(default)s)")
    p.add_argument("--envelopes", type=int, default=10,
                   help="envelopes per session (default: %(default)s)")
    p.add_argument("--workers", type=int, default=3,
                   help="worker processes (default: %(default)s)")
    p.add_argument("--think-ms", type=float, default=5.0,
                   help="how long each turn 'thinks' (default: %(default)s)")
    p.add_argument("--send-seconds", type=float, default=6.0,
                   help="spread the sends over about this long (default: %(default)s)")
    p.add_argument("--no-kill", action="store_true", help="do not kill a worker part-way")
    p.add_argument("--timeout", type=float, default=90.0,
                   help="give up waiting for turns after this long (default: %(default)s)")
    p.set_defaults(func=run_demo)


@dataclass
class Workers:
    """The demo's worker processes: started, killed, restarted and stopped by PID."""

    command: list[str]
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    expected_exit: set[int] = field(default_factory=set)

    def start(self, index: int) -> None:
        """Start worker ``index`` (replacing a dead one at that index)."""
        with open(self.log_dir / f"worker-{index + 1}.log", "ab") as log:
            proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        if index < len(self.procs):
            self.procs[index] = proc
        else:
            self.procs.append(proc)

    def kill(self, index: int) -> None:
        """SIGKILL worker ``index``: a crash, nothing is handed back."""
        proc = self.procs[index]
        self.expected_exit.add(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def check_alive(self) -> None:
        """Raise :class:`WorkerError` if a worker exited on its own."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None and proc.pid not in self.expected_exit:
                raise WorkerError(f"worker {i + 1} exited with {proc.returncode}: "
                                  f"{self.log_tail(i)}")

    def log_tail(self, index: int) -> str:
        """The last non-empty line worker ``index`` logged."""
        try:
            text = (self.log_dir / f"worker-{index + 1}.log").read_text(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM every worker (they drain), SIGKILL what is left after ``grace``."""
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            self.expected_exit.add(proc.pid)
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _worker_command(args: argparse.Namespace, url: str) -> list[str]:
    command = [sys.executable, "-m", "sessionbus.cli", "--url", url]
    if args.prefix:
        command += ["--prefix", args.prefix]
    command += ["worker", "sessionbus._demo_agent:handle", "--group", DEMO_GROUP]
    for name, value in DEMO_WORKER_TIMINGS.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    return command


def _check_options(args: argparse.Namespace) -> None:
    for name, low, high in (("sessions", 1, 100_000), ("envelopes", 1, 10_000),
                            ("workers", 1, 32)):
        value = getattr(args, name)
        if not low <= value <= high:
            raise ConfigError(f"--{name} must be in {low}..{high}, got {value}")
    if not 0 <= args.think_ms <= 10_000 or not args.send_seconds >= 0 or not args.timeout > 0:
        raise ConfigError("--think-ms must be in 0..10000, --send-seconds >= 0, --timeout > 0")


class _Progress:
    """The live progress line: rewritten in place on a terminal, a line now and then if not."""

    def __init__(self, tally: Tally, total: int, workers: Workers) -> None:
        self.tally, self.total, self.workers = tally, total, workers
        self.started = time.monotonic()
        self.events: list[str] = []
        self.tty = sys.stdout.isatty()
        self._last = ""

    def line(self) -> str:
        t = self.tally
        up = sum(p.poll() is None for p in self.workers.procs)
        rate = t.turns / max(time.monotonic() - self.started, 1e-9)
        text = (f"{time.monotonic() - self.started:5.1f}s  sent {len(t.sent_at)}/{self.total}"
                f"  done {t.handled}/{self.total}  {rate:.0f} turns/s"
                f"  redelivered {t.redelivered}  workers {up}/{len(self.workers.procs)}")
        return text + (f"  [{self.events[-1]}]" if self.events else "")

    def event(self, text: str) -> None:
        self.events.append(f"{text} at {time.monotonic() - self.started:.1f}s")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_TTY if self.tty else _PROGRESS_PLAIN)
            self.show()

    def show(self, *, final: bool = False) -> None:
        text = self.line()
        if self.tty:
            # Past the terminal's width the line would wrap and \r could not redraw it.
            width = shutil.get_terminal_size().columns - 1
            print("\r" + text[:width].ljust(width), end="\n" if final else "", flush=True)
        elif text != self._last:
            print("  " + text, flush=True)
        self._last = text


async def _bounded(jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the jobs with at most :data:`_PARALLEL` at a time, in order of the list."""
    gate = asyncio.Semaphore(_PARALLEL)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


async def _wait_for_workers(sb: SessionBus, workers: Workers, count: int) -> None:
    deadline = time.monotonic() + 60.0
    key_filter = sb.names.worker_group_filter(DEMO_GROUP)
    while time.monotonic() < deadline:
        workers.check_alive()
        with nats_errors("listing workers"):
            if len(await sb.workers_kv.list(key_filter)) >= count:
                return
        await asyncio.sleep(0.1)
    raise BusTimeout(f"{count} demo workers did not join within 60 s")


async def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` command."""
    _check_options(args)
    run_id = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="sessionbus-demo-") as tmp:
        async with open_bus(args, quiet_embedded=True, data_dir=str(Path(tmp) / "data")) as sb:
            url = sb.url if sb.embedded is not None else _configured_url(args)
            where = (f"embedded nats-server at {url} (data in {tmp})" if sb.embedded
                     else f"nats-server at {url}")
            print(f"sessionbus demo: {args.sessions} sessions x {args.envelopes} envelopes, "
                  f"{args.workers} worker processes of group {DEMO_GROUP!r}\n  using {where}",
                  flush=True)
            workers = Workers(_worker_command(args, url), Path(tmp))
            try:
                return await _run(sb, args, workers, run_id)
            finally:
                await asyncio.to_thread(workers.stop)


def _configured_url(args: argparse.Namespace) -> str:
    # The workers get the URL as given, query options (domain...) included.
    url: str = args.url or os.environ.get(URL_ENV, "")
    return url


async def _run(sb: SessionBus, args: argparse.Namespace, workers: Workers, run_id: str) -> int:
    n_sessions, n_envelopes = args.sessions, args.envelopes
    total = n_sessions * n_envelopes
    tally = Tally(envelopes_per_session=n_envelopes)
    progress = _Progress(tally, total, workers)

    async def on_record(msg: Msg) -> None:
        try:
            tally.record(TurnRecord.from_wire(msg.data))
        except BusError:
            pass  # not ours: someone else's token stream on the same agent id

    with nats_errors("subscribing to the demo's turn records"):
        sub = await sb.nc.subscribe(sb.names.agent_output_all(DEMO_GROUP), cb=on_record)
    try:
        for i in range(args.workers):
            workers.start(i)
        await _wait_for_workers(sb, workers, args.workers)
        print(f"  {args.workers} workers joined; opening {n_sessions} sessions", flush=True)

        ids = [checked_id(f"demo-{run_id}-{k:05d}") for k in range(n_sessions)]
        sessions: list[Session] = await _bounded([
            functools.partial(sb.open, sid, participants=[CLIENT, DEMO_GROUP],
                              participant=CLIENT, metadata={"demo": run_id})
            for sid in ids
        ])
        ticker = asyncio.create_task(progress.run())
        try:
            await _send_all(sessions, args, tally, workers, progress)
            await _wait_done(tally, total, workers, args.timeout)
        finally:
            ticker.cancel()
            progress.show(final=True)
        closed = await _bounded([functools.partial(s.close, "demo finished") for s in sessions])
        verdict = tally.verdict(ids)
        _summary(args, tally, verdict, progress, closed=len(closed))
        return 0 if verdict.ok else 1
    finally:
        await sub.unsubscribe()


async def _send_all(sessions: list[Session], args: argparse.Namespace, tally: Tally,
                    workers: Workers, progress: _Progress) -> None:
    n_envelopes = args.envelopes
    pause = args.send_seconds / n_envelopes
    kill_after = None if args.no_kill else max(0, math.ceil(n_envelopes / 3) - 1)
    victim = len(workers.procs) // 2
    restart: asyncio.Task[None] | None = None

    async def send(session: Session, index: int) -> None:
        tally.sent(session.session_id, index)
        await session.send(event_type=DEMO_EVENT,
                           event_data=demo_event_data(index, think_ms=args.think_ms))

    async def restart_later() -> None:
        await asyncio.sleep(1.0)
        workers.start(victim)
        progress.event(f"worker {victim + 1} restarted")

    for index in range(n_envelopes):
        round_start = time.monotonic()
        await _bounded([functools.partial(send, s, index) for s in sessions])
        workers.check_alive()
        if index == kill_after:
            workers.kill(victim)
            progress.event(f"worker {victim + 1} killed (SIGKILL)")
            restart = asyncio.create_task(restart_later())
        await asyncio.sleep(max(0.0, pause - (time.monotonic() - round_start)))
    if restart is not None:
        await restart


async def _wait_done(tally: Tally, total: int, workers: Workers, within: float) -> None:
    deadline = time.monotonic() + within
    while tally.handled < total and time.monotonic() < deadline:
        workers.check_alive()
        await asyncio.sleep(0.05)


def _summary(args: argparse.Namespace, tally: Tally, verdict: Verdict, progress: _Progress,
             *, closed: int) -> None:
    total = args.sessions * args.envelopes
    latencies = tally.latencies()
    rows = [
        ("sessions", f"{args.sessions} opened, {closed} closed"),
        ("envelopes", f"{len(tally.sent_at)} sent, {tally.handled} handled"
                      + (f", {verdict.missing} MISSING" if verdict.missing else "")),
        ("turns", f"{tally.turns} run by {args.workers} worker processes in "
                  f"{tally.elapsed():.1f} s: {tally.turns_per_second():.0f} turns/s "
                  f"(sends paced over ~{args.send_seconds:g} s)"),
        ("latency", f"p50 {percentile(latencies, 0.5) * 1000:.1f} ms, p99 "
                    f"{percentile(latencies, 0.99) * 1000:.1f} ms (send to turn done"
                    + ("; includes the killed worker's failover)" if progress.events
                       else ")")),
        ("redeliveries", f"{tally.redelivered} turns were redeliveries, {tally.repeated} "
                         "envelopes handled again (at-least-once)"),
    ]
    if progress.events:
        rows.append(("failover", "; ".join(progress.events)))
    order = (f"held in {verdict.in_order}/{verdict.sessions} sessions"
             + (f"; {verdict.overlapping} sessions had overlapping turns"
                if verdict.overlapping else "; no overlapping turns"))
    rows.append(("per-session order", order))
    for example in verdict.examples:
        rows.append(("", example))
    rows.append(("result", "OK" if verdict.ok else
                 f"FAILED ({tally.handled}/{total} handled)"))
    print("\nsummary")
    for name, value in rows:
        print(f"  {name:<18} {value}")
