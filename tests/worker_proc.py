"""Worker tests' shared helpers, and a worker process for the multi-process tests.

Run as a script it joins a group and logs one JSON line per handled
envelope, ``{sid, seq, idx, start, end, worker, attempt}``, written with
one ``os.write`` on an ``O_APPEND`` descriptor so every line that was
logged survives a SIGKILL. With ``--log-starts`` it also logs a line
``{"ev": "start", ...}`` when a turn starts and ``{"ev": "cancel", ...}``
when one is cancelled, so a turn cut by a kill shows as a start without an
end (:func:`read_records` skips those lines; the fault suite reads them)::

    python tests/worker_proc.py --url nats://127.0.0.1:4222 --prefix t1 \\
        --group g --worker-id w1 --log /tmp/w1.jsonl

It drains on SIGTERM (``handle_signals=True``), and runs on the event loop
that ``SESSIONBUS_EVENT_LOOP`` names (asyncio's when unset; ``uvloop`` as
``sessionbus worker`` runs where uvloop is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from sessionbus.bus import SessionBus
from sessionbus.bus._loop import LOOP_ENV
from sessionbus.bus._loop import run as run_on_loop
from sessionbus.bus.errors import SessionExists
from sessionbus.schemas import Envelope, SessionMetadata, encode
from sessionbus.workers import Turn, Worker, WorkerConfig

#: Timings for tests: a dead worker's partitions move within ~5.5 s.
FAST = WorkerConfig(
    lease_ttl=2, ack_wait=1.0, poll_interval=0.5, priority_timeout=2.5,
    retry_backoff=0.05, drain_timeout=10.0, handover_timeout=10.0,
)

#: ``--timings`` choices: the test timings above, or the defaults users run with.
TIMINGS = {"fast": FAST, "default": WorkerConfig()}


T = TypeVar("T")


async def poll(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *,
               within: float = 10.0, every: float = 0.05) -> T:
    """Call ``fetch`` until ``ok`` accepts the result or ``within`` s pass; return the last."""
    deadline = time.monotonic() + within
    for _ in itertools.count():
        value = await fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every)
    raise AssertionError("unreachable")


def envelope(sid: str, idx: int, **fields: Any) -> Envelope:
    """A test envelope carrying its index in the session."""
    return Envelope(session_id=sid, sender_id="client", event_data={"idx": idx}, **fields)


async def ensure_sessions(sb: SessionBus, session_ids: Iterable[str]) -> None:
    """Create the records of sessions this bus does not know yet (workers run no others)."""

    limit = asyncio.Semaphore(128)

    async def create(sid: str) -> None:
        async with limit:
            with contextlib.suppress(SessionExists):
                await sb.lifecycle.create(SessionMetadata(session_id=sid, ttl_seconds=None))

    todo = {sid for sid in session_ids if sb.lifecycle.states.meta(sid) is None}
    await asyncio.gather(*(create(sid) for sid in todo))


async def publish(sb: SessionBus, env: Envelope) -> None:
    """Store an envelope the way ``Session.send`` does, without the registry round trips."""
    await ensure_sessions(sb, [env.session_id])
    await sb.js.publish(sb.names.inbound(env.session_id), encode(env),
                        headers={"Nats-Msg-Id": env.envelope_id})


async def publish_many(sb: SessionBus, envs: Iterable[Envelope]) -> None:
    """Store many envelopes with pipelined publishes, in order per session."""
    envs = list(envs)
    await ensure_sessions(sb, [env.session_id for env in envs])
    futures = []
    for env in envs:
        futures.append(await sb.js.publish_async(
            sb.names.inbound(env.session_id), encode(env),
            headers={"Nats-Msg-Id": env.envelope_id},
        ))
    await asyncio.gather(*futures)


@dataclass(frozen=True, slots=True)
class Record:
    """One handled envelope as a worker process logged it."""

    sid: str
    seq: int
    idx: int
    start: float
    end: float
    worker: str
    attempt: int


def read_records(paths: Iterable[str]) -> list[Record]:
    """Every complete line of the given logs (a torn last line of a killed process is skipped)."""
    out: list[Record] = []
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue
                data = json.loads(line)
                if "ev" not in data:
                    out.append(Record(**data))
    return out


def check_history(records: list[Record], *, sessions: int, per_session: int) -> list[str]:
    """Problems with a run: missing envelopes, order broken, turns of a session overlapping.

    Within a session, ordered by start time, the handled indexes must never
    go back (a re-run of the same index right after itself is allowed here;
    callers decide whether duplicates are acceptable), must cover
    ``0..per_session-1``, and a turn must end before the next one starts.
    """
    problems: list[str] = []
    by_session: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_session[r.sid].append(r)
    if len(by_session) != sessions:
        problems.append(f"{len(by_session)} sessions handled, expected {sessions}")
    for sid, recs in by_session.items():
        recs.sort(key=lambda r: (r.start, r.end))
        idxs = [r.idx for r in recs]
        if sorted(set(idxs)) != list(range(per_session)):
            missing = sorted(set(range(per_session)) - set(idxs))
            problems.append(f"{sid}: missing {missing}")
        for a, b in itertools.pairwise(recs):
            if b.idx < a.idx:
                problems.append(f"{sid}: idx {b.idx} ran after {a.idx} ({a.worker}->{b.worker})")
            if b.start < a.end:
                problems.append(f"{sid}: idx {a.idx}@{a.worker} [{a.start:.4f},{a.end:.4f}] "
                                f"overlaps idx {b.idx}@{b.worker} starting {b.start:.4f}")
        if len(problems) > 20:
            break
    return problems


def duplicates(records: list[Record]) -> dict[tuple[str, int], list[Record]]:
    """Envelopes (session, idx) handled more than once."""
    seen: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for r in records:
        seen[(r.sid, r.idx)].append(r)
    return {k: v for k, v in seen.items() if len(v) > 1}


async def _main(args: argparse.Namespace) -> None:
    # Named first on stderr, so a run can tell which loop its workers had.
    print(f"event loop: {type(asyncio.get_running_loop()).__module__}", file=sys.stderr,
          flush=True)
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(**fields: Any) -> None:
        os.write(fd, (json.dumps(fields) + "\n").encode())

    async def handle(turn: Turn) -> None:
        start = time.time()
        idx = turn.envelope.event_data["idx"]
        base = {"sid": turn.session_id, "seq": turn.sequence, "idx": idx,
                "worker": args.worker_id, "attempt": turn.attempt}
        if args.log_starts:
            log(ev="start", t=start, **base)
        try:
            if args.sleep > 0:
                await asyncio.sleep(args.sleep)
            if args.reply:
                await turn.reply(f"done {idx}", event_data={"reply_to": idx,
                                                            "worker": args.worker_id})
        except asyncio.CancelledError:
            if args.log_starts:
                log(ev="cancel", t=time.time(), **base)
            raise
        log(start=start, end=time.time(), **base)

    options: dict[str, Any] = {"prefix": args.prefix}
    if args.domain:
        options["domain"] = args.domain
    async with SessionBus(args.url.split(","), **options) as sb:
        worker = Worker(sb, group=args.group, handler=handle, worker_id=args.worker_id,
                        handle_signals=True, config=TIMINGS[args.timings],
                        max_concurrency=args.concurrency)
        await worker.run()
    os.close(fd)


def main() -> None:
    """Parse arguments and run one worker until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timings", choices=sorted(TIMINGS), default="fast")
    parser.add_argument("--domain", default="")
    parser.add_argument("--reply", action="store_true",
                        help="reply into the session at the end of each turn")
    parser.add_argument("--log-starts", action="store_true",
                        help="also log turn starts and cancellations")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s {args.worker_id} %(name)s %(levelname)s %(message)s")
    run_on_loop(_main(args), event_loop=os.environ.get(LOOP_ENV, "asyncio"))


if __name__ == "__main__":
    main()
