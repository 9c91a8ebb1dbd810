"""``sessionbus sessions open | ls | show | close | tail`` and ``sessionbus send``: inspect
and drive sessions on a running bus.

Every command validates the session id before connecting, reads through
the public :class:`~sessionbus.bus.Session` API, prints results on stdout and notes on
stderr. ``tail`` follows a session live (optionally from its first
envelope) until Ctrl-C, or until the session is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from sessionbus._cli_common import (
    Commands,
    add_command,
    checked_id,
    format_age,
    note,
    open_bus,
    stop_event,
)
from sessionbus.bus._history import LiveFeed
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusTimeout, ConnectionFailed
from sessionbus.bus.session import Session
from sessionbus.schemas import EV_TEXT, Envelope, SessionMetadata, SessionState

__all__ = ["add_parsers", "format_envelope"]

logger = logging.getLogger(__name__)

#: After a session closes, ``tail`` keeps printing until the feed is quiet this long.
_TAIL_SETTLE = 0.5
#: ... and at most this long.
_TAIL_SETTLE_MAX = 3.0


def add_parsers(commands: Commands) -> None:
    """Register ``sessions`` (with its subcommands) and ``send``."""
    sessions = add_command(
        commands, "sessions", help="open | ls | show ID | close ID | tail ID: manage sessions",
        description="Inspect and drive sessions.",
    )
    sub = sessions.add_subparsers(dest="sessions_command", metavar="COMMAND", required=True)

    open_ = add_command(sub, "open", help="open a new session",
                        description="Open a new session and print its id.")
    open_.add_argument("session_id", metavar="ID", nargs="?",
                       help="the id (default: a new random one)")
    open_.add_argument("--participant", action="append", default=[], metavar="AGENT",
                       help="a participant (repeat for several)")
    open_.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                       help="idle timeout (default: the bus's, one hour)")
    open_.add_argument("--max-depth", type=int, default=None, metavar="N",
                       help="delegation depth limit (default: the bus's, 8)")
    open_.set_defaults(func=cmd_open)

    ls = add_command(sub, "ls", help="list sessions", description="List sessions, oldest first.")
    ls.add_argument("--state", choices=[s.value for s in SessionState] + ["all"], default="all",
                    help="only sessions in this state (default: %(default)s)")
    ls.add_argument("--limit", type=int, default=None, help="show at most this many")
    ls.add_argument("--json", action="store_true", help="print JSON records")
    ls.set_defaults(func=cmd_ls)

    show = add_command(sub, "show", help="show one session's record",
                          description="Show a session's record and, optionally, its history.")
    show.add_argument("session_id", metavar="ID")
    show.add_argument("--history", action="store_true", help="also print its envelopes")
    show.add_argument("--json", action="store_true", help="print the record as JSON")
    show.set_defaults(func=cmd_show)

    close = add_command(sub, "close", help="close a session",
                           description="Close a session: every node hears it at once.")
    close.add_argument("session_id", metavar="ID")
    close.add_argument("--reason", default="closed from the command line",
                       help="recorded close reason (default: %(default)r)")
    close.set_defaults(func=cmd_close)

    tail = add_command(
        sub, "tail", help="follow a session's envelopes live",
        description="Print a session's envelopes as they arrive, until Ctrl-C or until "
                    "the session is closed.",
    )
    tail.add_argument("session_id", metavar="ID")
    tail.add_argument("--from-start", action="store_true",
                      help="print the stored history first, then follow")
    tail.add_argument("--participant", metavar="AGENT",
                      help="only what this participant receives")
    tail.set_defaults(func=cmd_tail)

    send = add_command(
        commands, "send", help="send a text envelope into a session",
        description="Send a text envelope into a session and print its envelope id.",
    )
    send.add_argument("session_id", metavar="ID")
    send.add_argument("text", metavar="TEXT")
    send.add_argument("--sender", default="user",
                      help="participant id to send as (default: %(default)s)")
    send.add_argument("--to", nargs="+", action="extend", metavar="AGENT",
                      help="audience (default: every participant but the sender)")
    send.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                      help="then wait this long for the first reply and print it")
    send.set_defaults(func=cmd_send)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _ttl(meta: SessionMetadata) -> str:
    return "-" if meta.ttl_seconds is None else f"{meta.ttl_seconds:g}s"


async def cmd_ls(args: argparse.Namespace) -> int:
    """``sessions ls``."""
    state = None if args.state == "all" else SessionState(args.state)
    async with open_bus(args) as sb:
        metas = await sb.list_sessions(state=state)
    if args.limit is not None:
        metas = metas[: max(0, args.limit)]
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in metas], indent=2))
        return 0
    if not metas:
        note("no sessions")
        return 0
    now = time.time()
    rows = [("SESSION", "STATE", "AGE", "IDLE TTL", "TASKS", "PARTICIPANTS", "REASON")]
    for m in metas:
        open_tasks = sum(not t.is_terminal() for t in m.tasks.values())
        rows.append((m.session_id, m.state.value, format_age(m.created_at, now), _ttl(m),
                     f"{open_tasks}/{len(m.tasks)}", ",".join(m.participants) or "-",
                     m.close_reason))
    print(_table(rows))
    return 0


# -- one session --------------------------------------------------------------------


def format_envelope(envelope: Envelope) -> str:
    """One line: time, sender, audience, event type (unless text) and content."""
    stamp = time.strftime("%H:%M:%S", time.localtime(envelope.created_at))
    stamp += f".{int(envelope.created_at % 1 * 1000):03d}"
    audience = ",".join(envelope.audience) if envelope.audience is not None else "*"
    body = (envelope.content if envelope.event_type == EV_TEXT
            else f"[{envelope.event_type}] {json.dumps(envelope.event_data, default=str)}")
    return f"{stamp}  {envelope.sender_id or '-'} -> {audience}  {body}"


async def _info(sb: SessionBus, session_id: str) -> tuple[Session, SessionMetadata]:
    session = sb.session(session_id)
    return session, await session.info()


async def cmd_open(args: argparse.Namespace) -> int:
    """``sessions open [ID]``."""
    session_id = checked_id(args.session_id) if args.session_id is not None else None
    participants = [checked_id(p, "participant") for p in args.participant]
    async with open_bus(args) as sb:
        session = await sb.open(session_id, participants=participants, ttl=args.ttl,
                                max_depth=args.max_depth)
    print(session.session_id)
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    """``sessions show ID``."""
    session_id = checked_id(args.session_id)
    async with open_bus(args) as sb:
        session, meta = await _info(sb, session_id)
        history = [e async for e in session.history()] if args.history else []
    if args.json:
        record: dict[str, Any] = meta.model_dump(mode="json")
        if args.history:
            record["history"] = [e.model_dump(mode="json") for e in history]
        print(json.dumps(record, indent=2))
        return 0
    fields = [
        ("session", meta.session_id), ("state", meta.state.value),
        ("created", f"{time.ctime(meta.created_at)} ({format_age(meta.created_at)} ago)"),
        ("updated", time.ctime(meta.updated_at)), ("idle ttl", _ttl(meta)),
        ("max depth", str(meta.max_depth)),
        ("participants", ", ".join(meta.participants) or "-"),
    ]
    if meta.closed_at is not None:
        fields.append(("closed", f"{time.ctime(meta.closed_at)}: {meta.close_reason or '-'}"))
    if meta.metadata:
        fields.append(("metadata", json.dumps(meta.metadata, default=str)))
    if meta.agents_streaming:
        fields.append(("streaming", ", ".join(meta.agents_streaming)))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}} {value}")
    if meta.tasks:
        print("tasks:")
        rows = [("  TASK", "AGENT", "STATE", "ENVELOPE")]
        for task in sorted(meta.tasks.values(), key=lambda t: t.created_at):
            rows.append((f"  {task.task_id}", task.agent or "-", task.state.value,
                         task.envelope_id or "-"))
        print(_table(rows))
    if args.history:
        print(f"history ({len(history)} envelopes):")
        for envelope in history:
            print("  " + format_envelope(envelope))
    return 0


async def cmd_close(args: argparse.Namespace) -> int:
    """``sessions close ID``."""
    session_id = checked_id(args.session_id)
    async with open_bus(args) as sb:
        session, meta = await _info(sb, session_id)
        if meta.is_terminal():
            print(f"{session_id} was already {meta.state.value}")
            return 0
        meta = await session.close(args.reason)
    print(f"{session_id} {meta.state.value}")
    return 0


async def cmd_tail(args: argparse.Namespace) -> int:
    """``sessions tail ID``: print envelopes as they arrive."""
    session_id = checked_id(args.session_id)
    participant = checked_id(args.participant, "participant") if args.participant else None
    async with open_bus(args) as sb:
        session, meta = await _info(sb, session_id)
        if meta.is_terminal():
            if args.from_start:
                async for envelope in session.history(participant):
                    print(format_envelope(envelope), flush=True)
            note(f"-- session {session_id} is {meta.state.value}: {meta.close_reason or '-'}")
            return 0
        stop = stop_event()
        async with session.live(participant, replay=args.from_start) as feed:
            note(f"following session {session_id} ({meta.state.value}); Ctrl-C to stop")
            closed = asyncio.ensure_future(session.wait_closed())
            stopped = asyncio.ensure_future(stop.wait())
            pending = asyncio.ensure_future(anext(feed))
            try:
                while True:
                    done, _ = await asyncio.wait(
                        {pending, closed, stopped}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if pending in done:
                        print(format_envelope(pending.result()), flush=True)
                        pending = asyncio.ensure_future(anext(feed))
                        continue
                    if stopped in done:
                        return 0
                    # Envelopes sent just before the close may still be on their way.
                    await _settle(feed, pending)
                    event = closed.result()
                    note(f"-- session {session_id} {event.state.value}: {event.reason or '-'}")
                    return 0
            finally:
                for task in (pending, closed, stopped):
                    task.cancel()


async def _settle(feed: LiveFeed, pending: asyncio.Future[Envelope]) -> None:
    deadline = time.monotonic() + _TAIL_SETTLE_MAX
    while time.monotonic() < deadline:
        done, _ = await asyncio.wait({pending}, timeout=_TAIL_SETTLE)
        if not done:
            break
        try:
            envelope = pending.result()
        except StopAsyncIteration:
            return
        print(format_envelope(envelope), flush=True)
        pending = asyncio.ensure_future(anext(feed))
    pending.cancel()


async def cmd_send(args: argparse.Namespace) -> int:
    """``send ID TEXT``: post a text envelope; with ``--wait``, print the first reply."""
    session_id = checked_id(args.session_id)
    sender = checked_id(args.sender, "participant")
    audience = [checked_id(a, "participant") for a in args.to] if args.to else None
    async with open_bus(args) as sb:
        session = sb.session(session_id, participant=sender)
        if args.wait is None:
            print(await session.send(args.text, audience=audience))
            return 0
        async with session.live() as feed:
            envelope_id = await session.send(args.text, audience=audience)
            print(envelope_id, flush=True)
            try:
                async with asyncio.timeout(args.wait):
                    async for envelope in feed:
                        if envelope.causation_id == envelope_id:
                            print(format_envelope(envelope), flush=True)
                            return 0
            except TimeoutError:
                raise BusTimeout(f"no reply in session {session_id!r} within "
                                 f"{args.wait:g}s") from None
    raise ConnectionFailed(f"lost the connection waiting for a reply in {session_id!r}")
