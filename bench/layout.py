"""nats-server's CPU per message for the envelope stream's layout, beside the raw baseline's.

``bench/throughput.py`` shows nats-server spending about three times the
CPU per envelope for sessionbus that it spends for the raw pipeline. This
bench takes sessionbus's client code out of the comparison: one raw
nats-py loop per consumer (pull 256, ack each) drains the same ``N``
messages, stored beforehand round-robin over ``S`` sessions, from each
layout, and nats-server's CPU over the drain is divided by ``N``:

* ``raw``: one stream, one unfiltered consumer (``bench/throughput.py``'s
  baseline);
* ``partitioned``: one stream, ``P`` consumers each filtered on its
  partition's subjects, ``<prefix>.p.<n>.*`` (the envelope stream's
  layout, without the pinning);
* ``stream-per-partition``: ``P`` streams, one unfiltered consumer each (a
  layout sessionbus does not use, for comparison).

Publishing is not measured (every layout stores the same messages with
the same ``Nats-Msg-Id``). Part of a busy consumer's cost goes by the
second, not by the message (it writes its state file up to 10 times a
second), so a layout drained more slowly shows more per message: the
rates are printed too (``raw`` drains through one consumer, the others
through ``P`` at once). Layouts alternate within a run; medians and
the range over ``--runs`` are printed, with the ratio to ``raw``.

    python bench/layout.py [--messages N] [--sessions S] [--partitions P] [--runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import nats
from _common import add_loop_option, environment, run_loop
from nats.js import JetStreamContext, api
from sessionbus.bus._server import NatsServer
from throughput import CpuMeter

LAYOUTS = ("raw", "partitioned", "stream-per-partition")
BODY = b"x" * 180
FETCH = 256
DRAIN_LIMIT = 120.0


async def _consumers(js: JetStreamContext, layout: str, tag: str,
                     partitions: int) -> list[tuple[str, str]]:
    """Create the layout's streams and consumers; their (stream, consumer) names."""
    ack = api.AckPolicy.EXPLICIT
    if layout == "stream-per-partition":
        out = []
        for p in range(partitions):
            stream = f"{tag}_{p}"
            await js.add_stream(api.StreamConfig(name=stream, subjects=[f"{tag}.p.{p}.*"]))
            await js.add_consumer(stream, api.ConsumerConfig(
                durable_name="c", ack_policy=ack, max_ack_pending=1024))
            out.append((stream, "c"))
        return out
    await js.add_stream(api.StreamConfig(name=tag, subjects=[f"{tag}.p.*.*"]))
    if layout == "raw":
        await js.add_consumer(tag, api.ConsumerConfig(
            durable_name="c", ack_policy=ack, max_ack_pending=10_000))
        return [(tag, "c")]
    for p in range(partitions):
        await js.add_consumer(tag, api.ConsumerConfig(
            durable_name=f"c{p}", ack_policy=ack, filter_subject=f"{tag}.p.{p}.*",
            max_ack_pending=1024))
    return [(tag, f"c{p}") for p in range(partitions)]


async def _store(js: JetStreamContext, tag: str, messages: int, sessions: int,
                 partitions: int) -> None:
    futures = []
    for i in range(messages):
        s = i % sessions
        futures.append(await js.publish_async(
            f"{tag}.p.{s % partitions}.s{s}", BODY, headers={"Nats-Msg-Id": f"{tag}-{i}"}))
        if len(futures) >= 4000:
            await asyncio.gather(*futures)
            futures = []
    await asyncio.gather(*futures)


async def drain(url: str, server_pid: int | None, layout: str, tag: str, *, messages: int,
                sessions: int, partitions: int) -> tuple[float | None, float]:
    """Server CPU per message (us) and messages/s of one drain of ``layout``."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    names: list[tuple[str, str]] = []
    try:
        names = await _consumers(js, layout, tag, partitions)
        await _store(js, tag, messages, sessions, partitions)
        subs = [await js.pull_subscribe_bind(consumer, stream) for stream, consumer in names]
        done = 0
        deadline = time.monotonic() + DRAIN_LIMIT
        drained = asyncio.get_running_loop().create_future()

        async def loop(sub: JetStreamContext.PullSubscription) -> None:
            # Each loop ends at its next empty pull once all are acked: the
            # drain's time and CPU end with the last ack, not with those pulls.
            nonlocal done
            while done < messages and time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(FETCH, timeout=0.2)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                for msg in msgs:
                    await msg.ack()
                done += len(msgs)
                if done >= messages and not drained.done():
                    await nc.flush()
                    drained.set_result((meter.per_envelope(messages), time.perf_counter()))

        meter = CpuMeter([server_pid])
        meter.start()
        start = time.perf_counter()
        await asyncio.gather(*(loop(sub) for sub in subs))
        if not drained.done():
            raise TimeoutError(f"{layout}: drained {done} of {messages} in {DRAIN_LIMIT:.0f}s")
        us, end = drained.result()
        return us, messages / (end - start)
    finally:
        # Each drain starts on a server without the earlier ones' streams.
        for stream in {stream for stream, _ in names}:
            await js.delete_stream(stream)
        await nc.close()


async def bench(args: argparse.Namespace) -> None:
    server = NatsServer(name="bench-layout").start()
    try:
        print(f"{environment()}; {args.messages} messages over {args.sessions} sessions, "
              f"{args.partitions} partitions, {args.runs} runs", flush=True)
        cpu: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        rates: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for run in range(args.runs):
            for i, layout in enumerate(LAYOUTS):
                us, rate = await drain(server.url, server.pid, layout, f"L{run}x{i}",
                                       messages=args.messages, sessions=args.sessions,
                                       partitions=args.partitions)
                if us is not None:
                    cpu[layout].append(us)
                rates[layout].append(rate)
        print(f"{'layout':22} | server CPU us/msg (min-max) | of raw | drain msg/s")
        raw = statistics.median(cpu["raw"]) if cpu["raw"] else 0.0
        for layout in LAYOUTS:
            v = cpu[layout]
            shown = (f"{statistics.median(v):6.1f} ({min(v):.1f}-{max(v):.1f})" if v
                     else "     - (no /proc)")
            of_raw = f"{statistics.median(v) / raw:.2f}x" if v and raw else "-"
            rate = statistics.median(rates[layout])
            print(f"{layout:22} | {shown:27} | {of_raw:>6} | {rate:9.0f}")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--sessions", type=int, default=5_000)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    add_loop_option(parser)
    args = parser.parse_args()
    for name in ("messages", "sessions", "partitions", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    run_loop(bench(args), args.loop)


if __name__ == "__main__":
    main()
