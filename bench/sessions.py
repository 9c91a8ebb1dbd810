"""Session throughput and close-broadcast latency against raw nats-py on one embedded server.

Measures, each phase bounded in operations and in time (``--max-seconds``):

* open/s (KV create of the record + the idle timer write),
* send/s awaited one by one and with ``--concurrency`` in flight,
* close/s (compare-and-set to CLOSED, timer delete, broadcast),
* close-broadcast latency p50/p99: from calling ``close()`` on one
  connection to a second connection's ``closed_events()`` delivering it,
  and the broadcast leg alone (published -> received);

then the raw nats-py baseline in the same run: JetStream publish awaited
and concurrent, KV ``create`` awaited, and core publish -> subscriber
latency across two connections. Ratios are sessionbus / raw.

    python bench/sessions.py [--quick] [--ops N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version

import nats
from nats.aio.msg import Msg

from bus import Session, SessionBus
from bus.kv import bucket_config
from bus.names import DEPTH_HEADER, MSG_ID_HEADER
from bus.server import NatsServer, server_version


@dataclass
class Rate:
    """One throughput phase."""

    ops: int
    seconds: float

    @property
    def per_second(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds if self.seconds else 0.0


@dataclass
class Latency:
    """One latency phase, in microseconds."""

    samples: list[float]

    def pct(self, q: float) -> float:
        """The ``q`` quantile (0..1) in microseconds."""
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6 if ordered else 0.0


async def rate(
    op: Callable[[int], Awaitable[object]], *, ops: int, concurrency: int, max_seconds: float
) -> Rate:
    """Run ``op(i)`` for i < ops with ``concurrency`` in flight, stopping at ``max_seconds``."""
    next_i = done = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < ops and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            await op(i)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Rate(done, time.perf_counter() - start)


async def bench_sessions(url: str, args: argparse.Namespace) -> dict[str, Rate | Latency]:
    out: dict[str, Rate | Latency] = {}
    run = uuid.uuid4().hex[:6]
    async with SessionBus(url) as sb, SessionBus(url) as other:
        sessions: list[Session] = []

        async def open_one(i: int) -> None:
            sessions.append(await sb.open(f"b{run}-{i}", participant="bench", ttl=600))

        await sb.open(f"warm{run}", ttl=600)  # starts the expiry watcher outside the timing
        out["open (awaited)"] = await rate(open_one, ops=args.ops, concurrency=1,
                                           max_seconds=args.max_seconds)
        target = sessions[0]
        out["send (awaited)"] = await rate(lambda i: target.send(f"m{i}"), ops=args.ops,
                                           concurrency=1, max_seconds=args.max_seconds)
        out[f"send ({args.concurrency} in flight)"] = await rate(
            lambda i: sessions[i % len(sessions)].send(f"c{i}"), ops=args.ops * 4,
            concurrency=args.concurrency, max_seconds=args.max_seconds)

        to_close = list(sessions)

        async def close_one(i: int) -> None:
            await to_close[i].close("bench")

        out["close (awaited)"] = await rate(close_one, ops=len(to_close), concurrency=1,
                                            max_seconds=args.max_seconds)

        end_to_end: list[float] = []
        close_calls: list[float] = []
        deadline = time.perf_counter() + args.max_seconds
        async with other.closed_events() as heard:
            for i in range(args.latency_samples):
                if time.perf_counter() > deadline:
                    break
                s = await sb.open(f"lat{run}-{i}", ttl=600)
                start = time.perf_counter()
                await s.close("latency")
                returned = time.perf_counter()
                # Broadcasts of the close phase may still be arriving: match ours.
                while (await asyncio.wait_for(anext(heard), 10)).session_id != s.session_id:
                    pass
                end_to_end.append(time.perf_counter() - start)
                close_calls.append(returned - start)
        out["close() call"] = Latency(close_calls)
        out["close() -> other connection hears it"] = Latency(end_to_end)
    return out


async def bench_raw(url: str, args: argparse.Namespace) -> dict[str, Rate | Latency]:
    out: dict[str, Rate | Latency] = {}
    nc = await nats.connect(url)
    sub_nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = f"RAW{uuid.uuid4().hex[:6]}"
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        payload = b"x" * 200  # about an encoded text envelope
        out["raw js publish (awaited)"] = await rate(
            lambda i: js.publish(f"{stream}.s", payload), ops=args.ops, concurrency=1,
            max_seconds=args.max_seconds)
        out[f"raw js publish ({args.concurrency} in flight)"] = await rate(
            lambda i: js.publish(f"{stream}.s{i % 64}", payload), ops=args.ops * 4,
            concurrency=args.concurrency, max_seconds=args.max_seconds)
        await js.delete_stream(stream)
        # The same bytes and headers a send carries, into the envelope stream
        # itself (partition transform, dedupe window, per-subject limits).
        async with SessionBus(url) as sb:
            envelope_stream = sb.names.envelope_stream
            subjects = [sb.names.inbound(f"raw{i}") for i in range(64)]

        def with_headers(i: int) -> Awaitable[object]:
            return js.publish(subjects[i % 64], payload, stream=envelope_stream, headers={
                MSG_ID_HEADER: uuid.uuid4().hex, DEPTH_HEADER: "0"})

        out["raw js publish + msg id, envelope stream (awaited)"] = await rate(
            with_headers, ops=args.ops, concurrency=1, max_seconds=args.max_seconds)
        out[f"raw js publish + msg id, envelope stream ({args.concurrency} in flight)"] = (
            await rate(with_headers, ops=args.ops * 4, concurrency=args.concurrency,
                       max_seconds=args.max_seconds))
        kv_name = f"raw_{uuid.uuid4().hex[:6]}"
        kv = await js.create_key_value(bucket_config(kv_name, replicas=1))
        out["raw kv create (awaited)"] = await rate(
            lambda i: kv.create(f"k{i}", payload), ops=args.ops, concurrency=1,
            max_seconds=args.max_seconds)
        await js.delete_key_value(kv_name)

        got: asyncio.Queue[float] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            got.put_nowait(time.perf_counter())

        await sub_nc.subscribe("raw.latency", cb=on_msg)
        await sub_nc.flush()
        samples: list[float] = []
        for _ in range(args.latency_samples):
            start = time.perf_counter()
            await nc.publish("raw.latency", payload)
            samples.append(await asyncio.wait_for(got.get(), 10) - start)
        out["raw core publish -> other connection"] = Latency(samples)
    finally:
        await nc.close()
        await sub_nc.close()
    return out


def show(results: dict[str, Rate | Latency]) -> None:
    for name, result in results.items():
        if isinstance(result, Rate):
            print(f"  {name:66s} {result.per_second:10,.0f} /s   ({result.ops} ops)")
        else:
            print(f"  {name:66s} p50 {result.pct(0.5):8,.0f} us  p99 {result.pct(0.99):8,.0f} us"
                  f"  mean {statistics.fmean(result.samples) * 1e6 if result.samples else 0:,.0f}"
                  f" us  ({len(result.samples)} samples)")


def ratio(ours: Rate | Latency, raw: Rate | Latency) -> str:
    if isinstance(ours, Rate) and isinstance(raw, Rate):
        return f"{ours.per_second / raw.per_second:.2f}x" if raw.per_second else "-"
    if isinstance(ours, Latency) and isinstance(raw, Latency):
        p50 = ours.pct(0.5) / raw.pct(0.5) if raw.pct(0.5) else 0
        p99 = ours.pct(0.99) / raw.pct(0.99) if raw.pct(0.99) else 0
        return f"p50 {p50:.1f}x, p99 {p99:.1f}x"
    return "-"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations")
    parser.add_argument("--ops", type=int, default=None, help="operations per phase")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.ops is None:
        args.ops = 300 if args.quick else 2000
    args.latency_samples = 100 if args.quick else 500
    server = NatsServer(name="bench-sessions").start()
    try:
        print(f"sessionbus bench: nats-server {server_version()}, "
              f"nats-py {version('nats-py')}, python {sys.version.split()[0]}, "
              f"{args.ops} ops per phase, loopback")
        ours = await bench_sessions(server.url, args)
        raw = await bench_raw(server.url, args)
    finally:
        server.stop()
    print("sessionbus:")
    show(ours)
    print("raw nats-py (same server, same run):")
    show(raw)
    conc = f"({args.concurrency} in flight)"
    print("ratios (sessionbus / raw):")
    env = "raw js publish + msg id, envelope stream"
    pairs = [
        ("open (awaited)", "raw kv create (awaited)", "open = KV create + timer write"),
        ("send (awaited)", "raw js publish (awaited)", ""),
        ("send (awaited)", f"{env} (awaited)", ""),
        (f"send {conc}", f"raw js publish {conc}", ""),
        (f"send {conc}", f"{env} {conc}", ""),
        ("close (awaited)", "raw kv create (awaited)", "close = get + CAS + delete + publish"),
        ("close() -> other connection hears it", "raw core publish -> other connection",
         "includes the KV compare-and-set"),
    ]
    for a, b, note in pairs:
        print(f"  {a:36s} vs {b:58s} {ratio(ours[a], raw[b]):>20s}  {note}")


if __name__ == "__main__":
    asyncio.run(main())
