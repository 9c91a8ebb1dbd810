"""The ``sessionbus`` command: run a server, workers and the demo; inspect and drive sessions.

::

    sessionbus demo                                 # everything on an embedded server
    sessionbus server --data-dir ./data             # nats-server with JetStream
    sessionbus worker examples.echo:handle --group echo
    sessionbus sessions ls | show ID | close ID | tail ID
    sessionbus send ID "hello" --wait 5
    sessionbus info                                 # the settings in effect

Commands that talk to a bus use ``--url`` (or ``SESSIONBUS_URL``), else
they start an embedded nats-server for their own run. Errors are one line
on stderr and a non-zero exit; ``--debug`` shows the traceback and debug
logs instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from sessionbus import _cli_auth, _cli_info, _cli_server, _cli_sessions, _cli_worker, _demo
from sessionbus._cli_common import global_options
from sessionbus.bus._loop import LOOP_ENV
from sessionbus.bus._loop import run as run_loop
from sessionbus.bus.errors import BusError
from sessionbus.bus.settings import URL_ENV

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

#: Exit code of a command that failed with a sessionbus error.
EXIT_ERROR = 1
#: Exit code after Ctrl-C in a command that does not run until stopped.
EXIT_INTERRUPTED = 130


def _version() -> str:
    try:
        return metadata.version("sessionbus")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="sessionbus",
        description="A session bus for AI agents on NATS JetStream.",
        epilog=f"Without --url or {URL_ENV}, commands start an embedded nats-server. "
               "Run 'sessionbus COMMAND --help' for a command's options.",
        parents=[global_options(on_command=False)],
    )
    parser.add_argument("--version", action="version", version=f"sessionbus {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _demo.add_parser(commands)
    _cli_server.add_parser(commands)
    _cli_worker.add_parser(commands)
    _cli_sessions.add_parsers(commands)
    _cli_info.add_parser(commands)
    _cli_auth.add_parsers(commands)
    return parser


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if debug
        else "%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def _one_line(message: str) -> str:
    """A multi-line message (e.g. with a server log tail) as its first and last lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            choice = getattr(args, "loop", None) or os.environ.get(LOOP_ENV) or "auto"
            result = run_loop(result, event_loop=choice)
        return int(result or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BusError as e:
        if args.debug:
            raise
        print(f"sessionbus: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if args.debug:
            raise
        # Not one of ours: still one line, and how to see more.
        print(f"sessionbus: unexpected {type(e).__name__}: {e} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
