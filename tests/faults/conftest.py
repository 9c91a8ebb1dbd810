"""The fault suite's marker: ``pytest -m "not faults"`` leaves the slow scenarios out."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: a fault scenario with real processes (seconds to ~30 s each)"
    )
