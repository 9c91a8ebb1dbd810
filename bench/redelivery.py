"""Deliveries per envelope under a CPU-bound worker: does in_progress keep up?

Stores ``--envelopes`` envelopes over ``--sessions`` sessions, then starts
one worker whose handler burns ``--cpu-ms`` of CPU per turn (the event loop
is busy, as with a real agent doing work in-process). Once everything is
acked, the group's consumers report how many deliveries they made in all:
a live worker should get each envelope once. Prints envelopes, deliveries,
redeliveries, the handled rate, and the raw baseline of the same run: the
same envelopes through one plain pull consumer (``ack_wait`` equal to the
worker's) with the same CPU burn per message, so the two show whether the
redeliveries come from the worker or from the load.

    python bench/redelivery.py [--envelopes N] [--sessions S] [--cpu-ms 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
from _common import add_loop_option, environment, run_loop
from nats.js import api
from sessionbus.bus import SessionBus
from sessionbus.bus._jsapi import consumer_info
from sessionbus.bus._server import NatsServer
from sessionbus.schemas import Envelope, decode, encode
from sessionbus.workers import Turn, Worker, WorkerConfig


def burn(ms: float) -> None:
    """Spin the CPU for ``ms`` milliseconds."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


async def sessionbus_run(url: str, args: argparse.Namespace) -> tuple[int, int, float]:
    """(envelopes, deliveries, handled per second) for one worker."""
    async with SessionBus(url, prefix="rd", partitions=16) as sb:
        sids = [f"s{i}" for i in range(args.sessions)]
        for sid in sids:
            await sb.open(sid, participant="client", participants=["g"])
        futures = []
        for i in range(args.envelopes):
            sid = sids[i % len(sids)]
            env = Envelope(session_id=sid, sender_id="client", event_data={"text": "x" * 64})
            futures.append(await sb.js.publish_async(sb.names.inbound(sid), encode(env),
                                                     headers={"Nats-Msg-Id": env.envelope_id}))
        await asyncio.gather(*futures)
        handled = 0
        done = asyncio.Event()

        async def handle(turn: Turn) -> None:
            nonlocal handled
            burn(args.cpu_ms)
            handled += 1
            if handled >= args.envelopes:
                done.set()

        async with SessionBus(url, prefix="rd") as wb:
            worker = Worker(wb, group="g", handler=handle, config=WorkerConfig(),
                            max_concurrency=64)
            start = time.perf_counter()
            await worker.start()
            await asyncio.wait_for(done.wait(), 900)
            rate = args.envelopes / (time.perf_counter() - start)
            await asyncio.sleep(1.0)  # acks in flight
            deliveries = 0
            for p in range(sb.partitions):
                info = await consumer_info(sb.nc, stream=sb.names.envelope_stream,
                                           consumer=sb.names.worker_consumer("g", p))
                deliveries += info["delivered"]["consumer_seq"]
            await worker.stop()
    return args.envelopes, deliveries, rate


async def raw_run(url: str, args: argparse.Namespace) -> tuple[int, int, float]:
    """The same through one plain pull consumer, burning the same CPU per message."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="RAWRD", subjects=["rawrd.>"])
    await js.add_consumer("RAWRD", api.ConsumerConfig(
        durable_name="raw", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=WorkerConfig().ack_wait,
        max_ack_pending=1024,
    ))
    futures = []
    for i in range(args.envelopes):
        env = Envelope(session_id=f"s{i % args.sessions}", sender_id="client",
                       event_data={"text": "x" * 64})
        futures.append(await js.publish_async(f"rawrd.{env.session_id}", encode(env)))
    await asyncio.gather(*futures)
    sub = await js.pull_subscribe_bind("raw", "RAWRD")
    handled = 0
    start = time.perf_counter()
    while handled < args.envelopes:
        try:
            msgs = await sub.fetch(256, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            decode(msg.data, Envelope)
            burn(args.cpu_ms)
            await msg.ack()
            handled += 1
    rate = args.envelopes / (time.perf_counter() - start)
    await asyncio.sleep(1.0)
    info = await js.consumer_info("RAWRD", "raw")
    await js.delete_stream("RAWRD")
    await nc.close()
    return args.envelopes, int(info.delivered.consumer_seq), rate


async def bench(args: argparse.Namespace) -> None:
    server = NatsServer(name="bench-redelivery").start()
    try:
        print(f"{environment()}; {args.envelopes} envelopes over {args.sessions} sessions, "
              f"{args.cpu_ms} ms CPU per turn")
        for name, result in (("sessionbus", await sessionbus_run(server.url, args)),
                             ("raw nats-py", await raw_run(server.url, args))):
            envelopes, deliveries, rate = result
            print(f"{name:12} envelopes {envelopes:7d}  deliveries {deliveries:7d}  "
                  f"redelivered {deliveries - envelopes:6d}  handled/s {rate:7.0f}")
    finally:
        server.stop()


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envelopes", type=int, default=30_000)
    parser.add_argument("--sessions", type=int, default=3_000)
    parser.add_argument("--cpu-ms", type=float, default=0.3)
    add_loop_option(parser)
    run_loop(bench(parser.parse_args()), parser.parse_args().loop)


if __name__ == "__main__":
    main()
