"""Which event loop to run on: uvloop when installed, else asyncio's.

``BusSettings.event_loop`` and the CLI's ``--loop`` (or
``SESSIONBUS_EVENT_LOOP``) take one of :data:`LOOP_CHOICES`:

* ``auto``: uvloop if it can be imported (the ``fast`` extra installs it),
  else asyncio's default loop;
* ``uvloop``: uvloop, or :class:`ConfigError` if it is not installed;
* ``asyncio``: asyncio's default loop.

A bus cannot change the loop it already runs on: :func:`check_running_loop`
only refuses ``uvloop`` asked for and not in use. Programs pick the loop
when they start one, with :func:`run` (what the CLI does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sessionbus.bus.errors import ConfigError

__all__ = ["LOOP_CHOICES", "LOOP_ENV", "check_running_loop", "loop_factory", "run"]

LOOP_CHOICES = ("auto", "uvloop", "asyncio")
#: Environment variable the CLI reads for its ``--loop`` default.
LOOP_ENV = "SESSIONBUS_EVENT_LOOP"

T = TypeVar("T")


def check_choice(choice: str) -> str:
    """``choice`` if it is one of :data:`LOOP_CHOICES`, else ConfigError."""
    if choice not in LOOP_CHOICES:
        raise ConfigError(f"event_loop must be one of {', '.join(LOOP_CHOICES)}, got {choice!r}")
    return choice


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of uvloop loops for ``choice``, or None for asyncio's default."""
    if check_choice(choice) == "asyncio":
        return None
    try:
        import uvloop  # optional dependency (the ``fast`` extra)
    except ImportError as e:
        if choice == "uvloop":
            raise ConfigError("event_loop 'uvloop' asked for, but uvloop is not installed "
                              "(pip install 'sessionbus[fast]')") from e
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, event_loop: str = "auto") -> T:
    """Run ``main`` to completion on a new loop chosen by ``event_loop``."""
    factory = loop_factory(event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_uvloop() -> bool:
    """True when the running loop is uvloop's."""
    return type(asyncio.get_running_loop()).__module__.startswith("uvloop")


def check_running_loop(choice: str) -> None:
    """ConfigError when ``choice`` is ``uvloop`` and the running loop is not."""
    if choice == "uvloop" and not running_uvloop():
        raise ConfigError("event_loop 'uvloop' asked for, but this bus runs on "
                          f"{type(asyncio.get_running_loop()).__name__}: start the "
                          "program with uvloop (sessionbus --loop uvloop, or uvloop.run)")
