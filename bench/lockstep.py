"""Cold history reads of two installs of sessionbus, in lock step: this one against another.

    python bench/lockstep.py OTHER_PYTHON [--size 1000] [--pairs 40] [--loop uvloop]

``OTHER_PYTHON`` is the interpreter of another environment with another
sessionbus installed (an earlier release, say). Each side runs in a
process of its own, with its own embedded server and one session of
``--size`` envelopes handled by a worker whose history cache is off. Then
the two read in turn: one ``turn.history()`` (timed in the handler) and
one ``Session.history()`` each, this side first in even pairs and the
other first in odd ones. Consecutive reads of the two are milliseconds
apart, so the machine's drift (a shared machine's per-read times vary by
half within minutes) falls on both sides of each pair; the figure to read
is the ratio per pair (other / this), at its median and quartiles.

Not part of the test suite; prints its figures and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

SESSION = "lockstep"


async def child(size: int) -> None:
    """One side: fill a session, then one read of each kind per ``go`` line on stdin."""
    # Only what every release of the bus has, so that an older one runs this too.
    from sessionbus.bus import SessionBus
    from sessionbus.bus._server import NatsServer
    from sessionbus.schemas import Envelope, encode
    from sessionbus.workers import Turn, Worker, WorkerConfig

    server = NatsServer(name="lockstep").start()
    loop = asyncio.get_running_loop()
    lines = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)
    try:
        async with SessionBus(server.url, partitions=16) as sb:
            timings: list[tuple[float, int]] = []
            handled = 0
            progressed = asyncio.Event()

            async def handle(turn: Turn) -> None:
                nonlocal handled
                if turn.envelope.event_data.get("probe"):
                    start = time.perf_counter()
                    found = await turn.history()
                    timings.append((time.perf_counter() - start, len(found)))
                handled += 1
                progressed.set()

            async def handled_to(target: int) -> None:
                while handled < target:
                    progressed.clear()
                    await asyncio.wait_for(progressed.wait(), 60)

            fields = {f.name for f in dataclasses.fields(WorkerConfig)}
            config = WorkerConfig(history_total=0) if "history_total" in fields else WorkerConfig()
            worker = Worker(sb, group="g", handler=handle, config=config, max_concurrency=64)
            await worker.start()
            try:
                await sb.open(SESSION, participant="client", participants=["g"])
                acks = []
                for i in range(size):
                    envelope = Envelope(session_id=SESSION, sender_id="client",
                                        event_data={"text": f"m{i} " + "x" * 64})
                    acks.append(await sb.js.publish_async(
                        sb.names.inbound(SESSION), encode(envelope),
                        headers={"Nats-Msg-Id": envelope.envelope_id}))
                await asyncio.gather(*acks)
                await handled_to(size)
                session = sb.session(SESSION, participant="client")
                print("ready", flush=True)
                probes = 0
                while (await lines.readline()).strip() == b"go":
                    await session.send(f"probe {probes}", event_data={"probe": True})
                    probes += 1
                    await handled_to(size + probes)
                    turn_s, length = timings[-1]
                    assert length == size + probes, (length, size + probes)
                    start = time.perf_counter()
                    found = [e async for e in session.history()]
                    client_s = time.perf_counter() - start
                    assert len(found) == size + probes
                    print(f"{turn_s} {client_s}", flush=True)
            finally:
                await worker.stop()
    finally:
        server.stop()


def _spawn(python: str, size: int, loop: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--child", "--size", str(size),
                             "--loop", loop],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit(f"{python}: the side did not start")
    return proc


def _read(proc: subprocess.Popen[str]) -> tuple[float, float]:
    stdin: IO[str] | None = proc.stdin
    assert stdin is not None and proc.stdout is not None
    stdin.write("go\n")
    stdin.flush()
    turn_s, client_s = proc.stdout.readline().split()
    return float(turn_s), float(client_s)


def _summary(what: str, this: list[float], other: list[float]) -> str:
    ratios = sorted(o / t for t, o in zip(this, other, strict=True))
    low, _, high = statistics.quantiles(ratios, n=4)
    return (f"{what}: this {statistics.median(this) * 1e3:.2f} ms, other "
            f"{statistics.median(other) * 1e3:.2f} ms (medians); other / this per pair: "
            f"median {statistics.median(ratios):.2f}x, quartiles {low:.2f}-{high:.2f}x, "
            f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x, {len(ratios)} pairs")


def main() -> None:
    """Parse arguments; run one side (``--child``) or both in lock step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other_python", nargs="?", help="interpreter of the other install")
    parser.add_argument("--size", type=int, default=1000, help="envelopes in the session")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop of both sides (uvloop must be installed in both)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.loop == "uvloop":  # not through the bench's helpers: older installs run this
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(child(args.size))
        else:
            asyncio.run(child(args.size))
        return
    if not args.other_python or args.size < 1 or args.pairs < 2:
        parser.error("give the other interpreter, --size >= 1 and --pairs >= 2")
    sides = {"this": _spawn(sys.executable, args.size, args.loop),
             "other": _spawn(args.other_python, args.size, args.loop)}
    results: dict[str, list[tuple[float, float]]] = {"this": [], "other": []}
    try:
        for pair in range(args.pairs):
            for name in ("this", "other") if pair % 2 == 0 else ("other", "this"):
                results[name].append(_read(sides[name]))
    finally:
        for proc in sides.values():
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(60)
    print(f"cold reads of {args.size} envelopes on {args.loop}; this: {sys.executable}, "
          f"other: {args.other_python}")
    for index, what in enumerate(("turn.history()", "Session.history()")):
        print(_summary(what, [r[index] for r in results["this"]],
                       [r[index] for r in results["other"]]))


if __name__ == "__main__":
    main()
