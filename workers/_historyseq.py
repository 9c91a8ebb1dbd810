"""What ``turn.history()`` returns: a read-only sequence of envelopes.

A worker keeps each active session's recent envelopes in a list it only
appends to (``workers/_recent.py`` replaces the list, never shifts it, when
it drops old envelopes or puts older ones in front). A turn's history is
then a window on that list, ``items[lo:hi]``, fixed when the turn asks:
handing it over costs the same for 10 envelopes as for 2,000, where a
copy of the list cost a few microseconds per thousand.

:class:`History` behaves as a list of envelopes for reading: ``len``,
indexing (negative too), slicing (a new list), iteration, ``reversed``,
``in``, ``index``, ``count``, ``==`` with a list or another History of the
same envelopes, and ``+`` (a new list). It cannot be changed: take
``list(history)`` for a list of one's own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import overload

from sessionbus.schemas import Envelope

__all__ = ["History"]


class History(Sequence[Envelope]):
    """A session's envelopes in stream order, read-only (a window on the worker's list)."""

    __slots__ = ("_hi", "_items", "_lo")

    def __init__(self, items: list[Envelope], lo: int = 0, hi: int | None = None) -> None:
        """The envelopes ``items[lo:hi]``; ``items`` must not change below ``hi`` afterwards."""
        self._items = items
        self._lo = lo
        self._hi = len(items) if hi is None else hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def newest(self, count: int | None) -> History:
        """The last ``count`` envelopes (all if fewer, or None), as a window on the same list."""
        if count is None or count >= self._hi - self._lo:
            return self
        return History(self._items, max(self._lo, self._hi - max(count, 0)), self._hi)

    @overload
    def __getitem__(self, index: int) -> Envelope: ...

    @overload
    def __getitem__(self, index: slice) -> list[Envelope]: ...

    def __getitem__(self, index: int | slice) -> Envelope | list[Envelope]:
        n = self._hi - self._lo
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._items[self._lo + start:self._lo + max(start, stop)]
            return [self._items[self._lo + i] for i in range(start, stop, step)]
        i = index.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("history index out of range")
        return self._items[self._lo + i]

    def __iter__(self) -> Iterator[Envelope]:
        # Bounded by the window even when the list grows while a turn iterates
        # (a list's own iterator would run on into what was stored later).
        return itertools.islice(self._items, self._lo, self._hi)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History | list):
            return NotImplemented
        return len(self) == len(other) and all(
            a is b or a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # unhashable, like a list

    def __add__(self, other: Sequence[Envelope]) -> list[Envelope]:
        return [*self, *other]

    def __radd__(self, other: Sequence[Envelope]) -> list[Envelope]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"History({list(self)!r})"
