"""tune_gc: the young generation's threshold, and nothing else of the collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from sessionbus.bus.errors import ConfigError
from sessionbus.workers._gc import GC_THRESHOLD, tune_gc


@pytest.fixture(autouse=True)
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_the_young_threshold_changes_and_the_older_ones_stay(
    thresholds: tuple[int, int, int],
) -> None:
    gc.set_threshold(700, 11, 12)
    assert tune_gc() == (700, 11, 12)
    assert gc.get_threshold() == (GC_THRESHOLD, 11, 12)
    assert tune_gc(2500) == (GC_THRESHOLD, 11, 12)
    assert gc.get_threshold() == (2500, 11, 12)
    assert gc.isenabled()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "1000"])
def test_a_threshold_below_one_or_not_an_integer_is_refused(bad: object) -> None:
    before = gc.get_threshold()
    with pytest.raises(ConfigError, match="gc threshold must be an integer >= 1"):
        tune_gc(bad)  # type: ignore[arg-type]
    assert gc.get_threshold() == before
