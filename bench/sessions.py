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
import time
import uuid
from collections.abc import Awaitable

import nats
from _common import Latency, Op, Rate, add_loop_option, environment, format_ratio, measure, run_loop
from nats.aio.client import Client
from nats.aio.msg import Msg
from sessionbus.bus import Session, SessionBus
from sessionbus.bus._kv import bucket_config
from sessionbus.bus._names import DEPTH_HEADER, MSG_ID_HEADER
from sessionbus.bus._server import NatsServer
from sessionbus.bus._subscriptions import server_holds_subscriptions


async def run(url: str, args: argparse.Namespace) -> tuple[dict[str, Rate | Latency],
                                                          dict[str, Rate | Latency]]:
    """Each sessionbus phase runs right after its raw baseline, so load drift hits both."""
    ours: dict[str, Rate | Latency] = {}
    raw: dict[str, Rate | Latency] = {}
    run_id = uuid.uuid4().hex[:6]
    conc = f"({args.concurrency} in flight)"
    payload = b"x" * 200  # about the size of an encoded text envelope
    nc = await nats.connect(url)
    sub_nc = await nats.connect(url)
    try:
        async with SessionBus(url) as sb, SessionBus(url) as other:
            js = nc.jetstream()
            plain = f"RAW{run_id}"
            await js.add_stream(name=plain, subjects=[f"{plain}.>"])
            kv_name = f"raw_{run_id}"
            kv = await js.create_key_value(bucket_config(kv_name, replicas=1))
            envelope_stream = sb.names.envelope_stream
            raw_subjects = [sb.names.inbound(f"raw{run_id}-{i}") for i in range(64)]

            def raw_envelope(i: int) -> Awaitable[object]:
                # The bytes and headers a send carries, into the envelope
                # stream itself (partition transform, dedupe, per-subject limit).
                return js.publish(raw_subjects[i % 64], payload, stream=envelope_stream,
                                  headers={MSG_ID_HEADER: uuid.uuid4().hex, DEPTH_HEADER: "0"})

            def bounded(op: Op, *, ops: int, concurrency: int = 1) -> Awaitable[Rate]:
                return measure(op, ops=ops, concurrency=concurrency,
                               max_seconds=args.max_seconds)

            await sb.open(f"warm{run_id}", ttl=600)  # starts the expiry watcher untimed
            sessions: list[Session] = []

            async def open_one(i: int) -> None:
                sessions.append(await sb.open(f"b{run_id}-{i}", participant="bench", ttl=600))

            raw["raw kv create (awaited)"] = await bounded(
                lambda i: kv.create(f"k{i}", payload), ops=args.ops)
            ours["open (awaited)"] = await bounded(open_one, ops=args.ops)

            target = sessions[0]
            raw["raw js publish (awaited)"] = await bounded(
                lambda i: js.publish(f"{plain}.s", payload), ops=args.ops)
            raw["raw js publish + msg id, envelope stream (awaited)"] = await bounded(
                raw_envelope, ops=args.ops)
            ours["send (awaited)"] = await bounded(lambda i: target.send(f"m{i}"), ops=args.ops)

            raw[f"raw js publish {conc}"] = await bounded(
                lambda i: js.publish(f"{plain}.s{i % 64}", payload), ops=args.ops * 4,
                concurrency=args.concurrency)
            raw[f"raw js publish + msg id, envelope stream {conc}"] = await bounded(
                raw_envelope, ops=args.ops * 4, concurrency=args.concurrency)
            ours[f"send {conc}"] = await bounded(
                lambda i: sessions[i % len(sessions)].send(f"c{i}"), ops=args.ops * 4,
                concurrency=args.concurrency)

            async def close_one(i: int) -> None:
                await sessions[i].close("bench")

            ours["close (awaited)"] = await bounded(close_one, ops=len(sessions))
            await js.delete_stream(plain)
            await js.delete_key_value(kv_name)

            raw["raw core publish -> other connection"] = await core_latency(nc, sub_nc, args)
            ours["close() call"], ours["close() -> other connection hears it"] = (
                await close_latency(sb, other, run_id, args))
    finally:
        await nc.close()
        await sub_nc.close()
    return ours, raw


async def close_latency(sb: SessionBus, other: SessionBus, run_id: str,
                        args: argparse.Namespace) -> tuple[Latency, Latency]:
    """close() duration, and close() until a second connection's feed delivers it."""
    end_to_end: list[float] = []
    calls: list[float] = []
    deadline = time.perf_counter() + args.max_seconds
    async with other.closed_events() as heard:
        for i in range(args.latency_samples):
            if time.perf_counter() > deadline:
                break
            s = await sb.open(f"lat{run_id}-{i}", ttl=600)
            start = time.perf_counter()
            await s.close("latency")
            returned = time.perf_counter()
            # Broadcasts of the close phase may still be arriving: match ours.
            while (await asyncio.wait_for(anext(heard), 10)).session_id != s.session_id:
                pass
            end_to_end.append(time.perf_counter() - start)
            calls.append(returned - start)
    return Latency(calls), Latency(end_to_end)


async def core_latency(nc: Client, sub_nc: Client, args: argparse.Namespace) -> Latency:
    """Core publish on one connection until a subscriber on another gets it."""
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        got.put_nowait(time.perf_counter())

    await sub_nc.subscribe("raw.latency", cb=on_msg)
    await server_holds_subscriptions(sub_nc, 5)
    samples: list[float] = []
    deadline = time.perf_counter() + args.max_seconds
    for _ in range(args.latency_samples):
        if time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        await nc.publish("raw.latency", b"x" * 64)
        samples.append(await asyncio.wait_for(got.get(), 10) - start)
    return Latency(samples)


def show(results: dict[str, Rate | Latency]) -> None:
    """One line per phase: a rate, or latency percentiles and mean."""
    for name, result in results.items():
        if isinstance(result, Rate):
            print(f"  {name:66s} {result.per_second:10,.0f} /s   ({result.ops} ops)")
        else:
            print(f"  {name:66s} p50 {result.pct(0.5):8,.0f} us  p99 {result.pct(0.99):8,.0f} us"
                  f"  mean {result.mean_us:,.0f} us  ({len(result.samples)} samples)")


def compare(ours: Rate | Latency, raw: Rate | Latency) -> str:
    """sessionbus / raw: of rates, or of latency p50 and p99."""
    if isinstance(ours, Rate) and isinstance(raw, Rate):
        return format_ratio(ours.per_second, raw.per_second)
    if isinstance(ours, Latency) and isinstance(raw, Latency):
        return (f"p50 {format_ratio(ours.pct(0.5), raw.pct(0.5))}, "
                f"p99 {format_ratio(ours.pct(0.99), raw.pct(0.99))}")
    return "-"


async def main(args: argparse.Namespace) -> None:
    if args.ops is None:
        args.ops = 300 if args.quick else 2000
    args.latency_samples = 100 if args.quick else 500
    server = NatsServer(name="bench-sessions").start()
    try:
        print(f"sessionbus bench: {environment()}, {args.ops} ops per phase, loopback")
        ours, raw = await run(server.url, args)
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
        ("close (awaited)", "raw kv create (awaited)",
         "close = CAS from the known record + broadcast + unacked timer delete"),
        ("close() -> other connection hears it", "raw core publish -> other connection",
         "includes the KV compare-and-set"),
    ]
    for a, b, note in pairs:
        print(f"  {a:36s} vs {b:58s} {compare(ours[a], raw[b]):>20s}  {note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations")
    parser.add_argument("--ops", type=int, default=None, help="operations per phase")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    add_loop_option(parser)
    cli_args = parser.parse_args()
    run_loop(main(cli_args), cli_args.loop)
