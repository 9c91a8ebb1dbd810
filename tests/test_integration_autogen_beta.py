"""autogen 0.14's ``autogen.beta`` history on the bus: sessionbus.integrations.autogen_beta."""

from __future__ import annotations

import uuid

import pytest
from sessionbus.bus.core import SessionBus

pytest.importorskip("autogen.beta", reason="autogen 0.14 is not installed (pip install autogen)")

from autogen.beta.context import ConversationContext
from autogen.beta.events import ToolCallEvent
from autogen.beta.stream import MemoryStream

from sessionbus.integrations.autogen_beta import NatsStorage


@pytest.mark.parametrize("serializer", ["json", "pickle"])
async def test_beta_storage_round_trips_in_order(bus: SessionBus, serializer: str) -> None:
    storage = NatsStorage(bus=bus, serializer=serializer)  # type: ignore[arg-type]
    stream = MemoryStream(storage)
    ctx = ConversationContext(stream=stream)
    for i in range(3):
        await stream.send(ToolCallEvent(name=f"f{i}", arguments=str(i)), ctx)
    reader = NatsStorage(bus=bus, serializer=serializer)  # type: ignore[arg-type]
    assert [e.name for e in await reader.get_history(stream.id)] == ["f0", "f1", "f2"]
    await reader.set_history(stream.id, [ToolCallEvent(name="only", arguments="")])
    assert [e.name for e in await storage.get_history(stream.id)] == ["only"]
    await storage.drop_history(stream.id)
    assert list(await storage.get_history(stream.id)) == []
    assert list(await storage.get_history(uuid.uuid4())) == []
