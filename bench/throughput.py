"""Worker runtime end to end against a raw nats-py pull pipeline, on one embedded server.

Measures, for 1 and 2 worker processes:

* envelopes/s from the first publish until every envelope's handler has
  returned and its ack reached the server (a trivial handler), over many
  sessions at once;
* turn-start latency p50/p99 on idle sessions: one envelope at a time into
  a session with nothing queued, from just before the publish to the
  handler's first line (clocks of one machine, reported back over core NATS);
* CPU per envelope over the throughput part, of the worker processes
  together and of nats-server (from /proc; blank where there is none):
  where the time goes when the two cores are shared;

and, in the same run, the raw baseline: the same envelopes published to a
plain stream, pulled in batches from one durable pull consumer shared by
the same number of processes, decoded and acked one by one (no partitions,
no pinning, no per-session order). Ratios are sessionbus / raw.

``--floor`` adds a third pipeline: the raw one, plus a record per envelope
shaped like a worker's completion record (the session's key in a stream
with one message per subject and a per-message TTL, the envelope's stream
sequence as its value), written with the bus's ``Replies`` (a worker
writes its records with the same framing, from ``workers/_completions.py``);
a fetched batch is acked once its records are confirmed, while the next
batches are fetched. Still no partitions, no pinning, no leases, and no
per-session order (a session's next envelope may be handled before the
record of its previous one is confirmed): its server CPU per envelope,
against the raw pipeline's, is what the records alone cost the server.

Both kinds of worker process run the cyclic garbage collector as
``sessionbus worker`` does (its young generation every 10,000 allocations);
``--gc-threshold 0`` keeps Python's default in both.

    python bench/throughput.py [--quick] [--envelopes N] [--sessions S] [--partitions P]
                               [--floor] [--gc-threshold N] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
from _common import add_loop_option, environment, percentile, ratio, run_loop
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from sessionbus.bus import SessionBus
from sessionbus.bus._jsapi import consumer_info
from sessionbus.bus._replies import Pending, Replies, acked_sequence
from sessionbus.bus._server import NatsServer
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus.errors import SessionExists
from sessionbus.schemas import Envelope, SessionMetadata, decode, encode
from sessionbus.workers import Turn, Worker, WorkerConfig
from sessionbus.workers._assignment import assign
from sessionbus.workers._gc import GC_THRESHOLD, tune_gc
from sessionbus.workers._membership import Lease

LATENCY_SUBJECT = "bench.latency"
RAW_STREAM = "RAW"
RAW_CONSUMER = "raw"
RECORD_STREAM = "RAWRECORDS"
RECORD_TTL = str(24 * 3600)  # a worker's default completion_ttl
#: Fetched batches whose records a raw worker waits for at once.
RECORD_BATCHES = 4
PHASE_LIMIT = 180.0


# -- the worker processes -------------------------------------------------------


async def run_sessionbus_worker(url: str, prefix: str, worker_id: str, *,
                                records: bool = True) -> None:
    """A worker process: trivial handler; envelopes marked ``lat`` report their start delay."""
    async with SessionBus(url, prefix=prefix) as sb:
        nc = sb.nc

        async def handle(turn: Turn) -> None:
            sent = turn.envelope.event_data.get("lat")
            if sent is not None:
                await nc.publish(LATENCY_SUBJECT, str(time.time() - sent).encode())

        worker = Worker(sb, group="bench", handler=handle, worker_id=worker_id,
                        handle_signals=True, max_concurrency=128,
                        config=WorkerConfig(completion_records=records))
        await worker.run()


async def run_raw_worker(url: str) -> None:
    """A raw pull loop: fetch in batches, decode, ack each (what the worker does, minus order)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(RAW_CONSUMER, RAW_STREAM)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(256, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue  # fetch() raises either when nothing arrived in time
        for msg in msgs:
            env = decode(msg.data, Envelope)
            sent = env.event_data.get("lat")
            if sent is not None:
                await nc.publish(LATENCY_SUBJECT, str(time.time() - sent).encode())
            await msg.ack()
    await nc.close()


async def run_floor_worker(url: str) -> None:
    """The raw pull loop plus a record per envelope (``--floor``).

    Each envelope's record is written as it is decoded; a batch is acked
    once all of its records are confirmed, while the next batches are
    fetched (at most ``RECORD_BATCHES`` wait at once).
    """
    nc = await nats.connect(url)
    js = nc.jetstream()
    replies = Replies(nc)
    headers = {"Nats-TTL": RECORD_TTL}
    settling: collections.deque[asyncio.Task[None]] = collections.deque()

    async def settle(msgs: list[Msg], written: list[Pending]) -> None:
        for pending in written:
            acked_sequence(await replies.wait(pending, within=30, what="a record"), "a record")
        for msg in msgs:
            await msg.ack()

    sub = await js.pull_subscribe_bind(RAW_CONSUMER, RAW_STREAM)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        while settling and (settling[0].done() or len(settling) >= RECORD_BATCHES):
            await settling.popleft()
        try:
            msgs = await sub.fetch(256, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue  # fetch() raises either when nothing arrived in time
        written = []
        for msg in msgs:
            env = decode(msg.data, Envelope)
            sent = env.event_data.get("lat")
            if sent is not None:
                await nc.publish(LATENCY_SUBJECT, str(time.time() - sent).encode())
            written.append(await replies.send(
                f"rawrec.{env.session_id}", str(msg.metadata.sequence.stream).encode(), headers))
        settling.append(asyncio.create_task(settle(msgs, written)))
    for task in settling:
        await task
    await replies.close()
    await nc.close()


# -- measuring ------------------------------------------------------------------


@dataclass
class Result:
    """One pipeline with one process count."""

    rate: float
    p50_us: float
    p99_us: float
    worker_cpu_us: float | None = None
    """CPU of the worker processes together, per envelope (None without /proc)."""
    server_cpu_us: float | None = None
    """CPU of nats-server per envelope (None without /proc)."""
    server_msgs: float = 0.0
    """Messages in and out of nats-server per envelope (publishes, pulls, acks, replies...)."""


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far, from /proc (None elsewhere)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_messages(server: NatsServer) -> int:
    """Messages into and out of ``server`` so far (its ``varz``)."""
    varz = server.monitor("varz")
    return int(varz["in_msgs"]) + int(varz["out_msgs"])


class CpuMeter:
    """CPU per envelope of some processes over a span: :meth:`start`, then :meth:`per_envelope`."""

    def __init__(self, pids: list[int | None]) -> None:
        self._pids = pids
        self._start: list[float | None] = []

    def start(self) -> None:
        """Note every process's CPU so far."""
        self._start = [cpu_seconds(pid) for pid in self._pids]

    def per_envelope(self, count: int) -> float | None:
        """Microseconds of CPU per envelope since :meth:`start`, summed over the processes."""
        total = 0.0
        for pid, begun in zip(self._pids, self._start, strict=True):
            now = cpu_seconds(pid)
            if now is None or begun is None:
                return None
            total += now - begun
        return total / count * 1e6


class Procs:
    """Child processes of one phase, stopped by PID."""

    def __init__(self, loop: str, gc_threshold: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.loop = loop
        self.gc_threshold = gc_threshold

    def spawn(self, *args: str) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--loop", self.loop,
             "--gc-threshold", str(self.gc_threshold), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))

    @property
    def pids(self) -> list[int | None]:
        """The children's process ids."""
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


async def until(check: Callable[[], Awaitable[bool]], what: str, limit: float) -> None:
    """Poll ``check`` until true; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {limit:.0f}s")
        await asyncio.sleep(0.02)


def envelopes(count: int, sessions: int, tag: str) -> list[Envelope]:
    """``count`` envelopes spread round-robin over ``sessions`` sessions."""
    return [Envelope(session_id=f"{tag}-{i % sessions}", sender_id="client",
                     event_data={"text": "x" * 64}) for i in range(count)]


async def create_records(sb: SessionBus, session_ids: list[str]) -> None:
    """Create the session records (no idle TTL), 256 at a time."""
    limit = asyncio.Semaphore(256)

    async def create(sid: str) -> None:
        async with limit:
            with contextlib.suppress(SessionExists):
                await sb.lifecycle.create(SessionMetadata(session_id=sid, ttl_seconds=None))

    await asyncio.gather(*(create(sid) for sid in session_ids))


async def timed_throughput(
    js: JetStreamContext, batch: list[tuple[str, bytes, str]],
    all_acked: Callable[[], Awaitable[bool]], what: str,
    worker_pids: list[int | None], server: NatsServer,
) -> tuple[float, float | None, float | None, float]:
    """Publish ``batch`` (subject, body, msg id) and wait until ``all_acked``.

    Returns envelopes/s from the first publish, the CPU per envelope of
    the workers together and of the server over that span, and the
    messages in and out of the server per envelope (the polls of
    ``all_acked`` included: one consumer info request each).
    """
    workers_cpu, server_cpu = CpuMeter(worker_pids), CpuMeter([server.pid])
    msgs_before = server_messages(server)
    workers_cpu.start()
    server_cpu.start()
    start = time.perf_counter()
    futures = [await js.publish_async(subject, data, headers={"Nats-Msg-Id": eid})
               for subject, data, eid in batch]
    await asyncio.gather(*futures)
    await until(all_acked, what, PHASE_LIMIT)
    rate = len(batch) / (time.perf_counter() - start)
    msgs = (server_messages(server) - msgs_before) / len(batch)
    return (rate, workers_cpu.per_envelope(len(batch)), server_cpu.per_envelope(len(batch)),
            msgs)


async def measure_latency(nc: Client, publish: Callable[[Envelope], Awaitable[None]],
                          samples: int, tag: str) -> tuple[float, float]:
    """Send one envelope at a time into an idle session; p50/p99 start delay in us."""
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        got.put_nowait(float(msg.data))

    sub = await nc.subscribe(LATENCY_SUBJECT, cb=on_msg)
    await server_holds_subscriptions(nc, 5)
    delays: list[float] = []
    try:
        for i in range(samples):
            env = Envelope(session_id=f"{tag}-idle-{i}", sender_id="client",
                           event_data={"lat": time.time()})
            await publish(env)
            delays.append(await asyncio.wait_for(got.get(), 30) * 1e6)
            await asyncio.sleep(0.005)  # let the session go idle again
    finally:
        await sub.unsubscribe()
    return percentile(delays, 0.5), percentile(delays, 0.99)


async def sessionbus_phase(url: str, server: NatsServer, procs_count: int, count: int,
                           sessions: int, samples: int, loop: str, gc_threshold: int,
                           records: bool = True, partitions: int | None = None) -> Result:
    prefix = f"bench{procs_count}"
    procs = Procs(loop, gc_threshold)
    # The workers take the partition count of the stream this creates.
    async with SessionBus(url, prefix=prefix, partitions=partitions) as sb:
        try:
            ids = [f"w{i}" for i in range(procs_count)]
            for wid in ids:
                procs.spawn("--role", "worker", "--url", url, "--prefix", prefix, "--id", wid,
                            *(() if records else ("--no-completion-records",)))
            wanted = {m: frozenset(ps) for m, ps in assign(sb.partitions, ids).items()}

            async def settled() -> bool:
                entries = await sb.workers_kv.list(sb.names.worker_group_filter("bench"))
                leases = [Lease.decode(e.value) for e in entries]
                return {lease.worker_id: lease.claims for lease in leases} == wanted

            await until(settled, "the workers to split the partitions", 60)
            unsettled = [sb.names.worker_consumer("bench", p) for p in range(sb.partitions)]

            async def all_acked() -> bool:
                # Called once every envelope is stored, so a consumer found
                # settled stays settled: each poll asks about one consumer
                # until it is, as the raw side's poll asks about its only one
                # (asking all 64 every poll loads the server being measured).
                while unsettled:
                    info = await consumer_info(sb.nc, stream=sb.names.envelope_stream,
                                               consumer=unsettled[-1])
                    if info["num_pending"] or info["num_ack_pending"]:
                        return False
                    unsettled.pop()
                return True

            # Workers run only sessions that exist: create the records untimed.
            await create_records(sb, [f"{prefix}-{i}" for i in range(sessions)]
                                 + [f"{prefix}-idle-{i}" for i in range(samples)])
            batch = [(sb.names.inbound(e.session_id), encode(e), e.envelope_id)
                     for e in envelopes(count, sessions, prefix)]
            rate, worker_us, server_us, msgs = await timed_throughput(
                sb.js, batch, all_acked, "every envelope acked", procs.pids, server)

            async def publish(env: Envelope) -> None:
                await sb.js.publish(sb.names.inbound(env.session_id), encode(env),
                                    headers={"Nats-Msg-Id": env.envelope_id})

            p50, p99 = await measure_latency(sb.nc, publish, samples, prefix)
        finally:
            procs.stop()
    return Result(rate, p50, p99, worker_us, server_us, msgs)


async def raw_phase(url: str, server: NatsServer, procs_count: int, count: int,
                    sessions: int, samples: int, loop: str, gc_threshold: int, *,
                    records: bool = False) -> Result:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for stream in (RAW_STREAM, RECORD_STREAM):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
    await js.add_stream(name=RAW_STREAM, subjects=["raw.>"], storage=api.StorageType.FILE)
    await js.add_consumer(RAW_STREAM, api.ConsumerConfig(
        durable_name=RAW_CONSUMER, ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=20_000,
    ))
    if records:
        # Shaped like the bus's KV buckets (one message per key, per-message TTL).
        await js.add_stream(api.StreamConfig(
            name=RECORD_STREAM, subjects=["rawrec.>"], storage=api.StorageType.FILE,
            max_msgs_per_subject=1, allow_msg_ttl=True, allow_direct=True,
            discard=api.DiscardPolicy.NEW,
        ))
    procs = Procs(loop, gc_threshold)
    try:
        for _ in range(procs_count):
            procs.spawn("--role", "raw-records" if records else "raw", "--url", url)

        async def all_acked() -> bool:
            info = await js.consumer_info(RAW_STREAM, RAW_CONSUMER)
            return not info.num_pending and not info.num_ack_pending

        async def pullers_ready() -> bool:
            info = await js.consumer_info(RAW_STREAM, RAW_CONSUMER)
            return (info.num_waiting or 0) >= procs_count

        await until(pullers_ready, "raw pullers", 60)
        batch = [(f"raw.{e.session_id}", encode(e), e.envelope_id)
                 for e in envelopes(count, sessions, "raw")]
        rate, worker_us, server_us, msgs = await timed_throughput(
            js, batch, all_acked, "every raw message acked", procs.pids, server)

        async def publish(env: Envelope) -> None:
            await js.publish(f"raw.{env.session_id}", encode(env),
                             headers={"Nats-Msg-Id": env.envelope_id})

        p50, p99 = await measure_latency(nc, publish, samples, "raw")
    finally:
        procs.stop()
        await js.delete_stream(RAW_STREAM)
        if records:
            await js.delete_stream(RECORD_STREAM)
        await nc.close()
    return Result(rate, p50, p99, worker_us, server_us, msgs)


def _cpu(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f}"


def _cpu_ratio(ours: float | None, raw: float | None) -> str:
    return "-" if ours is None or raw is None else f"{ratio(ours, raw):.2f}"


async def bench(args: argparse.Namespace) -> None:
    server = NatsServer(name="bench").start()
    try:
        print(f"{environment()}, {os.cpu_count()} cpus; "
              f"{args.envelopes} envelopes over {args.sessions} sessions, "
              f"{args.partitions or 'default'} partitions, {args.samples} latency samples, "
              f"gc threshold {args.gc_threshold or 'Python default'}")
        rows = []
        for n in (1, 2):
            ours = await sessionbus_phase(server.url, server, n, args.envelopes, args.sessions,
                                          args.samples, args.loop, args.gc_threshold,
                                          records=not args.no_completion_records,
                                          partitions=args.partitions)
            raw = await raw_phase(server.url, server, n, args.envelopes, args.sessions,
                                  args.samples, args.loop, args.gc_threshold)
            floor = None
            if args.floor:
                floor = await raw_phase(server.url, server, n, args.envelopes,
                                        args.sessions, args.samples, args.loop,
                                        args.gc_threshold, records=True)
            rows.append((n, ours, raw, floor))
        print(f"{'workers':>7} | {'':12} | {'env/s':>8} | {'p50 us':>8} | {'p99 us':>8} | "
              f"{'worker CPU us/env':>17} | {'server CPU us/env':>17} | {'server msgs/env':>15}")
        for n, ours, raw, floor in rows:
            shown = [("sessionbus", ours), ("raw nats-py", raw)]
            if floor is not None:
                shown.append(("raw+records", floor))
            for name, r in shown:
                print(f"{n if r is ours else '':>7} | {name:12} | {r.rate:8.0f} | "
                      f"{r.p50_us:8.0f} | {r.p99_us:8.0f} | {_cpu(r.worker_cpu_us):>17} | "
                      f"{_cpu(r.server_cpu_us):>17} | {r.server_msgs:15.1f}")
            for name, r in zip(("ratio", "floor ratio"), [r for _, r in shown[::2]], strict=False):
                # sessionbus, and the floor, against raw
                print(f"{'':>7} | {name:12} | {ratio(r.rate, raw.rate):8.2f} | "
                      f"{ratio(r.p50_us, raw.p50_us):8.2f} | "
                      f"{ratio(r.p99_us, raw.p99_us):8.2f} | "
                      f"{_cpu_ratio(r.worker_cpu_us, raw.worker_cpu_us):>17} | "
                      f"{_cpu_ratio(r.server_cpu_us, raw.server_cpu_us):>17} | "
                      f"{ratio(r.server_msgs, raw.server_msgs):15.2f}")
        print(json.dumps({f"{n}proc": {"sessionbus": vars(o), "raw": vars(r),
                                       **({"raw_records": vars(f)} if f else {})}
                          for n, o, r, f in rows}))
    finally:
        server.stop()


def main() -> None:
    """Parse arguments; run the benchmark or, as a child, one worker process."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer envelopes and samples")
    parser.add_argument("--envelopes", type=int, default=None)
    parser.add_argument("--sessions", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--role", choices=("bench", "worker", "raw", "raw-records"),
                        default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--id", help=argparse.SUPPRESS)
    parser.add_argument("--no-completion-records", action="store_true",
                        help="workers write no completion records (what they cost)")
    parser.add_argument("--floor", action="store_true",
                        help="add the raw pipeline with a record per envelope (see above)")
    parser.add_argument("--partitions", type=int, default=None,
                        help="partitions of the envelope stream (default: the settings' 64)")
    parser.add_argument("--gc-threshold", type=int, default=GC_THRESHOLD,
                        help="young-generation threshold of the worker processes' garbage "
                             "collector, both kinds (default: %(default)s; 0: Python's)")
    add_loop_option(parser)
    args = parser.parse_args()
    if args.gc_threshold < 0:
        parser.error(f"--gc-threshold must be >= 0 (0 keeps Python's), got {args.gc_threshold}")
    if args.role in ("worker", "raw", "raw-records") and args.gc_threshold:
        tune_gc(args.gc_threshold)
    if args.role == "worker":
        run_loop(run_sessionbus_worker(args.url, args.prefix, args.id,
                                       records=not args.no_completion_records), args.loop)
        return
    if args.role == "raw":
        run_loop(run_raw_worker(args.url), args.loop)
        return
    if args.role == "raw-records":
        run_loop(run_floor_worker(args.url), args.loop)
        return
    args.envelopes = args.envelopes or (10_000 if args.quick else 50_000)
    args.sessions = args.sessions or (500 if args.quick else 5_000)
    args.samples = args.samples or (50 if args.quick else 300)
    run_loop(bench(args), args.loop)


if __name__ == "__main__":
    main()
