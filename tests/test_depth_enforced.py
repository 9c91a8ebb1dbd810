"""Depth and envelope shape enforced by the bus, not only by a well-behaved client."""

from __future__ import annotations

from typing import Any

import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus.errors import BusError, InvalidEnvelope


def nested(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


async def test_a_too_deeply_nested_event_is_a_typed_bus_error(bus: SessionBus) -> None:
    s = await bus.open("deep-data")
    with pytest.raises(InvalidEnvelope) as refused:
        await s.send(event_type="custom", event_data=nested(5_000))
    assert isinstance(refused.value, BusError)
    assert refused.value.session_id == "deep-data"
    assert [e async for e in s.history()] == []  # nothing was stored
