"""Waiting in tests for a condition to hold, never for a fixed time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


async def until(condition: Callable[[], bool], what: str, within: float = 10.0,
                every: float = 0.02) -> None:
    """Poll ``condition`` every ``every`` s; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


async def stepped_until(condition: Callable[[], bool], what: str, steps: int = 10_000) -> None:
    """Run the event loop one step at a time until ``condition`` holds (no clock involved).

    For catching a request between being sent and being answered: the
    condition is checked after every step, and the answer is a round trip
    to the server away, where a sleep of any length could let it in.
    """
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} did not happen within {steps} loop steps")


def _all_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (``T`` in /proc)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended
        if state not in ("T", "t"):
            return False
    return True


async def sigstop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until all its threads have stopped.

    The signal is only queued when ``os.kill`` returns: a thread running on
    another core may still handle what arrives meanwhile.
    """
    os.kill(pid, signal.SIGSTOP)
    await until(lambda: _all_stopped(pid), f"process {pid} to stop", every=0.001)
