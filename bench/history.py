"""Reading a session's history: turn.history() warm and cold, Session.history(), raw replay.

For sessions of 10 / 1,000 / 10,000 stored envelopes (``--sizes``), on one
embedded server:

* ``turn.history() warm``: a worker that pulled the session's envelopes
  itself serves the history from memory; timed inside the handler over
  ``--probes`` turns, each one envelope after the previous;
* ``turn.history() cold``: the same with the worker's history cache off
  (``WorkerConfig(history_total=0)``): every call reads the stream;
* ``turn.history(last=50)``: the warm case asking only for the newest 50
  (``--window``): what a handler with a bounded context pays once the
  session is past ``history_per_session``; and the same with the cache
  off (a worker that has not seen the session, after a takeover);
* ``Session.history()``: a client replaying the whole session; and
  ``Session.history(last=50)`` (``--window``), the newest 50 only;
* ``raw ordered consumer``: nats-py's ordered consumer on the session's
  subject, delivering everything stored, ending when caught up (the
  baseline: one consumer per read, one message at a time, nothing decoded);
* ``replay + decode``: the same ordered consumer read the way
  ``Session.history()`` read a session before Direct Get and consumer
  reads (``bus._history.replay_messages``, each envelope decoded): what a
  cold history cost then.

And the causation lookup a reply (or a worker's check of one) makes when
its process has not seen the causing envelope, on a fresh connection each
time (``--repeats``):

* ``lookup``: the first lookup (of the session's first envelope);
* ``unknown id``: then lookups of ids the session does not hold (a forged
  causation), 3 on the same connection;
* ``raw header scan``: nats-py's ordered consumer on the session's subject,
  headers only, until caught up (how a lookup read the session before).

Figures are the median milliseconds per call; ratios are sessionbus / raw
and sessionbus / replay + decode (below 1: faster).

    python bench/history.py [--sizes 10,1000,10000] [--probes 20] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time

from _common import add_loop_option, environment, format_ratio, run_loop
from sessionbus.bus import SessionBus
from sessionbus.bus._history import find_depth, replay_messages
from sessionbus.bus._names import DEPTH_HEADER, MSG_ID_HEADER
from sessionbus.bus._server import NatsServer
from sessionbus.schemas import Envelope, decode, encode
from sessionbus.workers import Turn, Worker, WorkerConfig


async def fill(sb: SessionBus, sid: str, count: int) -> None:
    """Open ``sid`` and store ``count`` envelopes in it, pipelined, headed as a send heads them."""
    await sb.open(sid, participant="client", participants=["g"])
    futures = []
    for i in range(count):
        env = Envelope(session_id=sid, sender_id="client", event_data={"text": f"m{i} " + "x" * 64})
        futures.append(await sb.js.publish_async(sb.names.inbound(sid), encode(env),
                                                 headers={MSG_ID_HEADER: env.envelope_id,
                                                          DEPTH_HEADER: str(env.depth)}))
    await asyncio.gather(*futures)


async def turn_history(sb: SessionBus, sizes: list[int], probes: int, *, warm: bool,
                       tag: str, last: int | None = None) -> dict[int, float]:
    """Median ms of ``turn.history(last=last)`` per size, timed in the handler."""
    timings: dict[str, list[float]] = {}
    lengths: dict[str, list[int]] = {}
    handled = 0
    progressed = asyncio.Event()

    async def handle(turn: Turn) -> None:
        nonlocal handled
        if turn.envelope.event_data.get("probe"):
            start = time.perf_counter()
            history = await (turn.history() if last is None else turn.history(last=last))
            timings.setdefault(turn.session_id, []).append(time.perf_counter() - start)
            lengths.setdefault(turn.session_id, []).append(len(history))
        handled += 1
        progressed.set()

    config = WorkerConfig()
    if not warm:
        if "history_total" not in {f.name for f in dataclasses.fields(WorkerConfig)}:
            config = WorkerConfig()  # an older sessionbus: every read is cold anyway
        else:
            config = dataclasses.replace(config, history_total=0)
    worker = Worker(sb, group="g", handler=handle, config=config, max_concurrency=64)
    await worker.start()
    out: dict[int, float] = {}
    try:
        for size in sizes:
            sid = f"{tag}-{size}"
            target = handled + size
            await fill(sb, sid, size)
            while handled < target:
                progressed.clear()
                await asyncio.wait_for(progressed.wait(), 60)
            session = sb.session(sid, participant="client")
            for i in range(probes):
                target = handled + 1
                await session.send(f"probe {i}", event_data={"probe": True})
                while handled < target:
                    progressed.clear()
                    await asyncio.wait_for(progressed.wait(), 60)
            # The stream keeps max_envelopes_per_session per session (oldest go first).
            cap = sb.settings.max_envelopes_per_session
            window = cap if last is None else last
            assert lengths[sid] == [min(cap, window, size + i + 1) for i in range(probes)], \
                lengths[sid][:3]
            out[size] = statistics.median(timings[sid]) * 1e3
    finally:
        await worker.stop()
    return out


async def session_history(sb: SessionBus, sid: str, repeats: int,
                          last: int | None = None) -> float:
    """Median ms of a client's ``Session.history()`` replay (of the newest ``last`` only)."""
    session = sb.session(sid, participant="client")
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        found = [e async for e in (session.history() if last is None
                                   else session.history(last=last))]
        samples.append(time.perf_counter() - start)
    assert found and (last is None or len(found) == min(last, len(found)))
    return statistics.median(samples) * 1e3


async def raw_replay(sb: SessionBus, sid: str, repeats: int, *,
                     headers_only: bool = False) -> float:
    """Median ms of a nats-py ordered consumer delivering the session, until caught up."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        sub = await sb.js.subscribe(sb.names.history_filter(sid), stream=sb.names.envelope_stream,
                                    ordered_consumer=True, headers_only=headers_only)
        while True:
            msg = await sub.next_msg(timeout=30)
            if msg.metadata.num_pending == 0:
                break
        await sub.unsubscribe()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


async def replay_decode(sb: SessionBus, sid: str, repeats: int) -> float:
    """Median ms of an ordered-consumer replay decoding every envelope (the old history read)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        found = [decode(msg.data, Envelope) async for msg in replay_messages(sb, sid)]
        samples.append(time.perf_counter() - start)
    assert found
    return statistics.median(samples) * 1e3


async def causation_lookups(sb: SessionBus, url: str, sid: str,
                            repeats: int) -> tuple[float, float]:
    """Median ms of a fresh connection's first lookup in ``sid``, then of an unknown id."""
    first = ""
    async for envelope in sb.session(sid).history():
        first = envelope.envelope_id
        break
    lookups, unknown = [], []
    for _ in range(repeats):
        async with SessionBus(url) as fresh:
            start = time.perf_counter()
            depth = await find_depth(fresh, sid, first)
            lookups.append(time.perf_counter() - start)
            for i in range(3):  # a fresh connection's own start-up work overlaps the first
                start = time.perf_counter()
                missing = await find_depth(fresh, sid, f"{i:032x}")
                unknown.append(time.perf_counter() - start)
                assert missing is None
        assert depth == 0
    return statistics.median(lookups) * 1e3, statistics.median(unknown) * 1e3


async def bench(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    server = NatsServer(name="bench-history").start()
    try:
        async with SessionBus(server.url, partitions=16) as sb:
            print(f"{environment()}; sizes {sizes}, {args.probes} probes each")
            warm = await turn_history(sb, sizes, args.probes, warm=True, tag="warm")
            cold = await turn_history(sb, sizes, args.probes, warm=False, tag="cold")
            windowed = await turn_history(sb, sizes, args.probes, warm=True, tag="window",
                                          last=args.window)
            cold_windowed = await turn_history(sb, sizes, args.probes, warm=False,
                                               tag="coldwindow", last=args.window)
            rows = []
            lookups = []
            newest: dict[int, float] = {}
            for size in sizes:
                sid = f"cold-{size}"
                client = await session_history(sb, sid, args.repeats)
                raw = await raw_replay(sb, sid, args.repeats)
                old = await replay_decode(sb, sid, args.repeats)
                rows.append((size, warm[size], cold[size], client, raw, old))
                newest[size] = await session_history(sb, sid, args.repeats, last=args.window)
                lookup, unknown = await causation_lookups(sb, server.url, sid, args.repeats)
                scan = await raw_replay(sb, sid, args.repeats, headers_only=True)
                lookups.append((size, lookup, unknown, scan))
    finally:
        server.stop()
    print(f"{'envelopes':>9} | {'turn warm ms':>12} | {'turn cold ms':>12} | "
          f"{'Session.history ms':>18} | {'raw replay ms':>13} | {'replay+decode ms':>16} | "
          f"cold/raw | client/raw | cold/replay+decode")
    for size, w, c, cl, raw, old in rows:
        print(f"{size:>9} | {w:12.3f} | {c:12.3f} | {cl:18.3f} | {raw:13.3f} | {old:16.3f} | "
              f"{format_ratio(c, raw):>8} | {format_ratio(cl, raw):>10} | "
              f"{format_ratio(c, old):>18}")
    print(f"{'envelopes':>9} | {'lookup ms':>9} | {'unknown id ms':>13} | "
          f"{'raw header scan ms':>18} | lookup/raw | unknown/raw")
    for size, lookup, unknown, raw in lookups:
        print(f"{size:>9} | {lookup:9.3f} | {unknown:13.3f} | {raw:18.3f} | "
              f"{format_ratio(lookup, raw):>10} | {format_ratio(unknown, raw):>11}")
    for size in sizes:
        print(f"turn.history(last={args.window}), worker has seen them, at {size} envelopes: "
              f"{windowed[size]:.3f} ms (the whole history: {warm[size]:.3f} ms); cache off: "
              f"{cold_windowed[size]:.3f} ms (the whole history: {cold[size]:.3f} ms)")
    for size, _, _, client, raw, _ in rows:
        print(f"Session.history(last={args.window}), a fresh read, at {size} envelopes: "
              f"{newest[size]:.3f} ms (the whole history: {client:.3f} ms; raw replay "
              f"{raw:.3f} ms: {format_ratio(newest[size], raw)})")
    base = rows[0][1]
    for size, w, *_ in rows[1:]:
        print(f"warm turn.history() at {size} envelopes / at {sizes[0]}: "
              f"{format_ratio(w, base)}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--window", type=int, default=50,
                        help="last= of the windowed turn.history() (default 50)")
    parser.add_argument("--repeats", type=int, default=5)
    add_loop_option(parser)
    args = parser.parse_args()
    run_loop(bench(args), args.loop)


if __name__ == "__main__":
    main()
