"""A sender process for the fault suite: opens sessions and sends numbered envelopes.

Each session gets envelopes ``0..per_session-1`` in order (one at a time,
the next only once the previous was acked), each with ``event_data
{"idx": i}`` and the idempotency key ``"<sid>:<i>"``. A send that times
out or fails on a lost connection is retried with the same key, as the
README recommends, until it is acked or ``--deadline`` passes; a session
whose send gives up sends nothing more. Every ack is logged as one JSON
line written with one ``os.write`` on an ``O_APPEND`` descriptor::

    {"ev": "ack", "sid": "s003", "idx": 4, "sent": <first attempt>, "t": <ack>,
     "attempts": 2}

then ``{"ev": "done"}`` at the end (``{"ev": "giveup", ...}`` for a send
abandoned at the deadline)::

    python tests/faults/sender_proc.py --url nats://127.0.0.1:4222 --prefix f \\
        --sessions 20 --per-session 5 --log /tmp/sender.jsonl

It runs on the event loop ``SESSIONBUS_EVENT_LOOP`` names (asyncio's when unset).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any

from sessionbus.bus import SessionBus
from sessionbus.bus._loop import LOOP_ENV
from sessionbus.bus._loop import run as run_on_loop
from sessionbus.bus.errors import BusError, SessionExists
from sessionbus.bus.session import Session


def session_id(index: int) -> str:
    """Name of the sender's ``index``-th session."""
    return f"s{index:04d}"


class Sender:
    """Sends every session's envelopes with retries; logs acks."""

    def __init__(self, sb: SessionBus, args: argparse.Namespace, fd: int) -> None:
        self.sb = sb
        self.args = args
        self.fd = fd
        self.deadline = time.monotonic() + args.deadline

    def log(self, **fields: Any) -> None:
        os.write(self.fd, (json.dumps(fields) + "\n").encode())

    async def retry(self, what: str, fn: Any) -> Any:
        """Run ``fn()`` until it returns, retrying timeouts and lost connections."""
        while True:
            try:
                return await asyncio.wait_for(fn(), timeout=self.args.timeout * 2)
            except (BusError, TimeoutError) as e:
                if isinstance(e, SessionExists) or time.monotonic() > self.deadline:
                    raise
                logging.getLogger("sender").info("%s: %s; retrying", what, e)
                await asyncio.sleep(0.1)

    async def open(self, index: int) -> Session:
        sid = session_id(index)

        async def make() -> Session:
            try:
                return await self.sb.open(sid, participant="client", ttl=3600)
            except SessionExists:  # a retried open whose first attempt got through
                session = self.sb.session(sid, participant="client")
                await session.info()
                return session

        result: Session = await self.retry(f"open {sid}", make)
        return result

    async def run_session(self, session: Session) -> None:
        sid = session.session_id
        for idx in range(self.args.per_session):
            sent = time.time()
            attempts = 0

            async def send(idx: int = idx) -> str:
                nonlocal attempts
                attempts += 1
                result: str = await session.send(event_data={"idx": idx},
                                                 idempotency_key=f"{sid}:{idx}")
                return result

            try:
                await self.retry(f"send {sid}#{idx}", send)
            except (BusError, TimeoutError) as e:
                self.log(ev="giveup", sid=sid, idx=idx, sent=sent, t=time.time(),
                         attempts=attempts, error=str(e))
                return
            self.log(ev="ack", sid=sid, idx=idx, sent=sent, t=time.time(), attempts=attempts)
            if self.args.pause > 0:
                await asyncio.sleep(self.args.pause)

    async def run(self) -> None:
        sessions = [await self.open(i) for i in range(self.args.sessions)]
        self.log(ev="opened", t=time.time())
        await asyncio.gather(*(self.run_session(s) for s in sessions))
        self.log(ev="done", t=time.time())


async def _main(args: argparse.Namespace) -> None:
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    options: dict[str, Any] = {"prefix": args.prefix, "request_timeout": args.timeout}
    if args.domain:
        options["domain"] = args.domain
    try:
        async with SessionBus(args.url.split(","), **options) as sb:
            await Sender(sb, args, fd).run()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def main() -> None:
    """Parse arguments and send until every session's envelopes are acked."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="server URL(s), comma separated")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--domain", default="")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--per-session", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds between a session's sends")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="request timeout of one send attempt")
    parser.add_argument("--deadline", type=float, default=60.0,
                        help="seconds after which failing sends give up")
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s sender %(name)s %(levelname)s %(message)s")
    run_on_loop(_main(args), event_loop=os.environ.get(LOOP_ENV, "asyncio"))


if __name__ == "__main__":
    main()
