"""The cyclic garbage collector of a worker process: how often its young generation runs.

A worker keeps a large, steady heap (held envelopes, each session's recent
history, the dedupe memory) and allocates a few dozen tracked objects per
envelope it runs. At CPython's default threshold (a young collection per
700 net allocations of tracked objects, on 3.11-3.13) a busy worker spent
about a seventh of its CPU in the collector; at :data:`GC_THRESHOLD`, a
third of that (README, "Benchmarks").

This is process-wide, so the library leaves it to the program:
``sessionbus worker`` calls :func:`tune_gc` unless ``--gc-threshold 0``; a
program that runs a :class:`~sessionbus.workers.Worker` itself can call
``gc.set_threshold(10_000)`` once at start-up.
"""

from __future__ import annotations

import gc

from sessionbus.bus.settings import check_int

__all__ = ["GC_THRESHOLD", "tune_gc"]

#: Net allocations of tracked objects between two young collections in a tuned process.
GC_THRESHOLD = 10_000


def tune_gc(threshold: int = GC_THRESHOLD) -> tuple[int, ...]:
    """Run the cyclic garbage collector's young generation every ``threshold`` allocations.

    Process-wide (``gc.set_threshold`` with one argument: the other
    thresholds stay as they are). Cycles are still collected, a little
    later. Returns the thresholds before, for ``gc.set_threshold`` to
    restore them. Raises ConfigError unless ``threshold`` is an integer of
    at least 1.
    """
    check_int(threshold, "gc threshold", least=1)
    before: tuple[int, ...] = gc.get_threshold()
    gc.set_threshold(threshold)
    return before
