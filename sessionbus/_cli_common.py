"""What every ``sessionbus`` command shares: settings from the command line, a quick
reachability probe, a bus scoped to the command, and plain output helpers.

A command that needs a bus gets one from :func:`open_bus`: ``--url`` wins,
then ``SESSIONBUS_URL``, else an embedded nats-server is started (and
stopped when the command ends). Before connecting to a URL the servers are
probed with a plain TCP connect, so a wrong address fails in about a
second with one clear line instead of after the client's reconnect loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO, TypeAlias
from urllib.parse import urlsplit

from sessionbus.bus._loop import LOOP_CHOICES, LOOP_ENV
from sessionbus.bus._names import validate_id
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import ConnectionFailed
from sessionbus.bus.settings import URL_ENV, BusSettings

__all__ = [
    "PROBE_TIMEOUT",
    "Commands",
    "add_command",
    "checked_id",
    "format_age",
    "global_options",
    "note",
    "open_bus",
    "probe_servers",
    "settings_from_args",
    "stop_event",
]

logger = logging.getLogger(__name__)

#: The subparsers action commands are added to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: Seconds a TCP connect to each server may take before it counts as down.
PROBE_TIMEOUT = 2.0
_DEFAULT_PORTS = {"nats": 4222, "tls": 4222}


def global_options(*, on_command: bool) -> argparse.ArgumentParser:
    """``--url``, ``--prefix``, ``--loop`` and ``--debug``, before or after the command.

    On a command they default to "not given", so a value given before the
    command name is not overwritten.
    """
    parser = argparse.ArgumentParser(add_help=False)
    unset: Any = argparse.SUPPRESS if on_command else None
    parser.add_argument("--url", metavar="URL", default=unset,
                        help="NATS server(s), e.g. nats://127.0.0.1:4222 or "
                             f"nats://a:4222,b:4222?domain=hub (default: ${URL_ENV})")
    parser.add_argument("--prefix", default=unset,
                        help="subject and bucket prefix (default: sb)")
    parser.add_argument("--loop", choices=LOOP_CHOICES, default=unset,
                        help="event loop: auto (uvloop when installed, the default), "
                             f"uvloop or asyncio (default: ${LOOP_ENV} or auto)")
    parser.add_argument("--debug", action="store_true",
                        default=argparse.SUPPRESS if on_command else False,
                        help="debug logging, and tracebacks on errors")
    return parser


_COMMAND_OPTIONS = global_options(on_command=True)


def add_command(commands: Commands, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add a command (or subcommand) parser that also takes the global options."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, parents=[_COMMAND_OPTIONS], **kwargs
    )
    return parser


def note(message: str, *, stream: TextIO | None = None) -> None:
    """Print an informational line to stderr (stdout stays for results)."""
    print(message, file=stream or sys.stderr, flush=True)


def checked_id(value: str, kind: str = "session id") -> str:
    """Validate an id given on the command line before any network call."""
    return validate_id(value, kind)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> BusSettings:
    """Bus settings from ``--url``/``SESSIONBUS_URL`` and ``--prefix``."""
    options: dict[str, Any] = dict(overrides)
    if getattr(args, "prefix", None):
        options["prefix"] = args.prefix
    if getattr(args, "loop", None):
        options["event_loop"] = args.loop
    return BusSettings.from_env(url=getattr(args, "url", None), **options)


async def probe_servers(servers: Sequence[str], *, within: float = PROBE_TIMEOUT) -> None:
    """Raise :class:`ConnectionFailed` unless at least one server accepts a TCP connection.

    WebSocket URLs are not probed (a proxy may sit in front of them).
    """
    errors: list[str] = []
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.scheme not in _DEFAULT_PORTS:
            return
        host = parts.hostname or "127.0.0.1"
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ConnectionFailed(f"bad server address {server!r}") from None
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
        except (OSError, TimeoutError) as e:
            if isinstance(e, TimeoutError):
                reason = "timed out"
            elif isinstance(e, ConnectionRefusedError):
                reason = "connection refused"
            elif e.strerror:
                reason = e.strerror
            elif e.errno and e.errno > 0:
                reason = os.strerror(e.errno)
            else:
                reason = str(e)
            errors.append(f"{host}:{port} ({reason.lower()})")
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise ConnectionFailed(f"no NATS server answering at {', '.join(errors)}")


@contextlib.asynccontextmanager
async def open_bus(
    args: argparse.Namespace, *, quiet_embedded: bool = False, **overrides: Any
) -> AsyncIterator[SessionBus]:
    """A started bus for one command, closed when it ends."""
    settings = settings_from_args(args, **overrides)
    logger.debug("settings: %r", settings)
    if settings.servers:
        await probe_servers(settings.servers)
    elif not quiet_embedded:
        note(f"note: no --url and no {URL_ENV}: using a new embedded nats-server")
    async with SessionBus(settings=settings) as sb:
        logger.debug("running with %r", sb)
        yield sb


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, for commands that run until stopped."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, event.set)
    return event


def format_age(since: float, now: float | None = None) -> str:
    """``since`` (epoch seconds) as a short age: ``42s``, ``5m``, ``3h``, ``2d``."""
    seconds = max(0.0, (time.time() if now is None else now) - since)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
