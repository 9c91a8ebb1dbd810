"""SessionRegistry throughput against raw nats-py KV on the same embedded server.

Measures register, get, get_for_call and update_metrics at concurrency 1
and 128, each for a bounded number of operations (and at most
``--max-seconds`` per phase), then the raw nats-py baseline in the same
run: ``js.key_value(...).put`` for the writes and ``.get`` for the reads,
on a bucket with the same settings. get_for_call is one filtered listing
(Direct Get ``multi_last``) of a call's 4 sessions; its baseline is a single
``kv.get``, since nats-py has no server-side filtered listing.

    python bench/registry.py [--quick] [--ops N]
"""

from __future__ import annotations

import argparse
import time

import nats
from _common import Op, Rate, add_loop_option, environment, measure, ratio, run_loop
from nats.js.kv import KeyValue
from sessionbus.bus import SessionBus, SessionRegistry
from sessionbus.bus._kv import bucket_config
from sessionbus.bus._server import NatsServer
from sessionbus.schemas.codec import encode

SESSIONS_PER_CALL = 4


Row = tuple[str, int, Rate, str, Rate]


async def phases(
    reg: SessionRegistry, kv: KeyValue, value: bytes, *, conc: int, ops: int,
    max_seconds: float,
) -> list[Row]:
    """The four registry operations and their raw baselines at one concurrency."""
    tag = f"k{conc}"
    calls = max(1, ops // SESSIONS_PER_CALL)

    def sid(i: int) -> str:
        return f"{tag}-s{i}"

    def call(i: int) -> str:
        return f"{tag}-c{i // SESSIONS_PER_CALL}"

    async def register(i: int) -> None:
        await reg.register(call(i), sid(i))

    async def get(i: int) -> None:
        assert await reg.get(call(i), sid(i)) is not None

    async def get_for_call(i: int) -> None:
        first = (i % calls) * SESSIONS_PER_CALL
        assert len(await reg.get_for_call(call(first))) == SESSIONS_PER_CALL

    async def update_metrics(i: int) -> None:
        await reg.update_metrics(call(i), sid(i), {"turns": i, "latency": 0.25})

    async def raw_put(i: int) -> None:
        await kv.put(f"{tag}.s{i}", value)

    async def raw_get(i: int) -> None:
        await kv.get(f"{tag}.s{i}")

    plan: list[tuple[str, Op, str, Op]] = [
        ("register", register, "kv.put", raw_put),
        ("get", get, "kv.get", raw_get),
        ("get_for_call", get_for_call, "kv.get", raw_get),
        ("update_metrics", update_metrics, "kv.put", raw_put),
    ]
    raw_results: dict[str, Rate] = {}
    rows: list[Row] = []
    for name, op, raw_name, raw_op in plan:
        ours = await measure(op, ops=ops, concurrency=conc, max_seconds=max_seconds)
        if raw_name not in raw_results:
            raw_results[raw_name] = await measure(
                raw_op, ops=ops, concurrency=conc, max_seconds=max_seconds
            )
        rows.append((name, conc, ours, raw_name, raw_results[raw_name]))
    return rows


async def run(ops: int, max_seconds: float) -> None:
    """Start a server, measure, print the table."""
    server = NatsServer(name="bench-registry").start()
    rows: list[Row] = []
    try:
        async with SessionBus(server.url) as sb, \
                SessionRegistry(sb, node_id="bench", ttl=120) as reg:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await js.create_key_value(bucket_config("bench_raw", replicas=1))
            kv = await js.key_value("bench_raw")
            now = time.time()
            value = encode({"session_id": "s", "call_id": "c", "node_id": "bench",
                            "started_at": now, "metrics_updated_at": now,
                            "metrics": {}, "expires_at": now + 120})
            for conc in (1, 128):
                rows += await phases(reg, kv, value, conc=conc, ops=ops,
                                     max_seconds=max_seconds)
            await nc.close()
    finally:
        server.stop()

    print(f"SessionRegistry vs raw nats-py KV, {ops} ops per phase, loopback, {environment()}")
    print(f"{'operation':<16}{'conc':>5}{'ops':>7}{'ops/s':>10}   {'baseline':<8}"
          f"{'ops/s':>10}{'ratio':>8}")
    for name, conc, ours, raw_name, raw in rows:
        print(f"{name:<16}{conc:>5}{ours.ops:>7}{ours.per_second:>10.0f}   {raw_name:<8}"
              f"{raw.per_second:>10.0f}{ratio(ours.per_second, raw.per_second):>8.2f}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 ops per phase")
    parser.add_argument("--ops", type=int, default=2000, help="operations per phase")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="time bound of each phase")
    add_loop_option(parser)
    args = parser.parse_args()
    ops = 300 if args.quick else max(1, min(args.ops, 100_000))
    run_loop(run(ops, args.max_seconds), args.loop)


if __name__ == "__main__":
    main()
