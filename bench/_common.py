"""What the benchmark scripts share: bounded timing loops, percentiles, ratios, version lines.

Imported by the scripts in this directory as ``from _common import ...``
(each runs as ``python bench/x.py``, which puts ``bench/`` on the path).
Every figure a script prints is one of two shapes: a :class:`Rate`
(operations over seconds) or a :class:`Latency` (samples in seconds,
reported in microseconds), with the raw nats-py baseline of the same run
beside it and the ratio sessionbus / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, TypeVar

from sessionbus.bus._server import server_version

__all__ = [
    "Latency",
    "Op",
    "Rate",
    "add_loop_option",
    "environment",
    "format_ratio",
    "measure",
    "percentile",
    "ratio",
    "run_loop",
]

T = TypeVar("T")

#: One benchmarked operation: called with the operation's index.
Op = Callable[[int], Awaitable[object]]


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples`` by nearest rank; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ratio(ours: float, raw: float) -> float:
    """``ours / raw``, or 0.0 when the baseline measured nothing."""
    return ours / raw if raw else 0.0


def format_ratio(ours: float, raw: float) -> str:
    """``ours / raw`` as ``"0.42x"``, or ``"-"`` when the baseline measured nothing."""
    return f"{ours / raw:.2f}x" if raw else "-"


@dataclass
class Rate:
    """One throughput phase: ``ops`` operations done in ``seconds``."""

    ops: int
    seconds: float

    @property
    def per_second(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds if self.seconds else 0.0


@dataclass
class Latency:
    """One latency phase: ``samples`` in seconds, reported in microseconds."""

    samples: list[float]

    def pct(self, q: float) -> float:
        """The ``q`` quantile (0..1) in microseconds."""
        return percentile(self.samples, q) * 1e6

    @property
    def mean_us(self) -> float:
        """The mean in microseconds (0.0 for no samples)."""
        return statistics.fmean(self.samples) * 1e6 if self.samples else 0.0


async def measure(op: Op, *, ops: int, concurrency: int = 1, max_seconds: float) -> Rate:
    """Run ``op(i)`` for i < ``ops`` with ``concurrency`` in flight, stopping at ``max_seconds``.

    Each worker claims the next index before awaiting, so every index runs
    exactly once; the deadline is checked before each claim, so a phase
    ends within one operation of ``max_seconds``.
    """
    next_i = done = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < ops and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            await op(i)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return Rate(done, time.perf_counter() - start)


def environment() -> str:
    """``nats-server X, nats-py Y, python Z, loop L``: what a run's figures depend on."""
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return (f"nats-server {server_version()}, nats-py {version('nats-py')}, "
            f"python {sys.version.split()[0]}, loop {loop}")


def add_loop_option(parser: argparse.ArgumentParser) -> None:
    """``--loop asyncio|uvloop``: the event loop every process of the run uses."""
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop of this process and its children")


def run_loop(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``main`` on the asyncio loop or on uvloop (which must be installed)."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
