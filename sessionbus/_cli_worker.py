"""``sessionbus worker MODULE:HANDLER --group NAME``: run a user's handler as a worker.

The handler is ``async def handle(turn) -> None`` (see :class:`sessionbus.workers.Turn`).
``MODULE`` is imported with the current directory on ``sys.path`` (as
``python -m`` would), so ``sessionbus worker examples.echo:handle`` works
from a checkout. The worker joins its group and runs until SIGTERM or
SIGINT, which drain it: running turns finish (up to ``--drain-timeout``),
the rest is handed back to the group, and the command exits 0. A second
signal stops at once.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from sessionbus._cli_common import Commands, add_command, checked_id, note, open_bus
from sessionbus.bus.errors import ConfigError
from sessionbus.workers._gc import GC_THRESHOLD, tune_gc

__all__ = ["add_parser", "load_handler"]

_SPEC = re.compile(r"(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)")
_TIMINGS = ("lease_ttl", "ack_wait", "poll_interval", "priority_timeout", "drain_timeout")


def add_parser(commands: Commands) -> None:
    """Register ``worker``."""
    p = add_command(
        commands, "worker", help="run a handler as a worker of a group",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("handler", metavar="MODULE:HANDLER",
                   help="the async handler to run, e.g. examples.echo:handle")
    p.add_argument("--group", required=True,
                   help="worker group (the agent type): workers of a group share its sessions")
    p.add_argument("--agent", help="participant id replies are sent as (default: the group)")
    p.add_argument("--concurrency", type=int, default=64, metavar="N",
                   help="turns this process runs at once, over different sessions "
                        "(default: %(default)s)")
    p.add_argument("--max-attempts", type=int, default=5, metavar="N",
                   help="runs of one envelope before it is dead-lettered (default: %(default)s)")
    p.add_argument("--gc-threshold", type=int, default=GC_THRESHOLD, metavar="N",
                   help="allocations between two young collections of Python's cyclic "
                        "garbage collector in this process; 0 keeps Python's own "
                        "(default: %(default)s)")
    timing = p.add_argument_group(
        "timing", "Failover pacing (seconds; see sessionbus.WorkerConfig). Every worker of a "
                  "group should use the same values. Defaults move a dead worker's sessions "
                  "within about 14 s.")
    for name in _TIMINGS:
        timing.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                            metavar="S")
    p.set_defaults(func=cmd_worker)


def load_handler(spec: str, *, search_path: str | None = None) -> Callable[..., Any]:
    """Import ``MODULE:HANDLER`` (``HANDLER`` may be dotted) and return the async callable.

    ``search_path`` (default: the current directory) goes first on
    ``sys.path``. Raises :class:`ConfigError` with one readable line for a
    malformed spec, a missing module or attribute, or a handler that is
    not async.
    """
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise ConfigError(f"bad handler {spec!r}: expected MODULE:HANDLER, "
                          "e.g. examples.echo:handle")
    path = os.path.abspath(search_path or os.getcwd())
    if path not in sys.path:
        sys.path.insert(0, path)
    module_name = match["module"]
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"bad handler {spec!r}: no module named {e.name!r}") from e
        raise ConfigError(f"bad handler {spec!r}: importing {module_name} failed: {e}") from e
    except Exception as e:
        raise ConfigError(f"bad handler {spec!r}: importing {module_name} failed: "
                          f"{type(e).__name__}: {e}") from e
    for part in match["attr"].split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"bad handler {spec!r}: {module_name} has no attribute "
                              f"{match['attr']!r}") from None
    call = getattr(target, "__call__", None)  # noqa: B004 - async __call__ counts too
    if not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)):
        raise ConfigError(f"bad handler {spec!r}: not an async function "
                          "(expected 'async def handle(turn) -> None')")
    handler: Callable[..., Any] = target
    return handler


async def cmd_worker(args: argparse.Namespace) -> int:
    """Run the worker until a signal drains it."""
    from sessionbus.workers import Worker, WorkerConfig

    handler = load_handler(args.handler)
    group = checked_id(args.group, "group")
    agent = checked_id(args.agent, "agent id") if args.agent else None
    timings = {name: getattr(args, name) for name in _TIMINGS if getattr(args, name) is not None}
    config = WorkerConfig().replace(**timings)
    if args.gc_threshold < 0:
        raise ConfigError(f"--gc-threshold must be >= 0 (0 keeps Python's), "
                          f"got {args.gc_threshold}")
    if args.gc_threshold:
        tune_gc(args.gc_threshold)
    async with open_bus(args) as sb:
        worker = Worker(sb, group=group, handler=handler, agent=agent,
                        max_concurrency=args.concurrency, max_attempts=args.max_attempts,
                        handle_signals=True, config=config)
        await worker.start()
        note(f"worker {worker.worker_id} of group {group!r} running {args.handler} "
             f"on {sb.url} (Ctrl-C or SIGTERM to drain)")
        await worker.wait_stopped()
        note(f"worker {worker.worker_id} left group {group!r}")
    return 0
