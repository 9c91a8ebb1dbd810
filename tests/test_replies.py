"""What a write's acknowledgement can say, and what each becomes."""

from __future__ import annotations

import nats.js.errors
import pytest
from sessionbus.bus._replies import Reply, stored_at
from sessionbus.bus.errors import BusError, ConnectionFailed


def test_an_acknowledgement_names_the_sequence() -> None:
    assert stored_at(Reply(b'{"stream":"s","seq":42}', None), "w") == 42
    assert stored_at(Reply(b'{"stream":"s","seq":7,"duplicate":true}', None), "w") == 7


def test_a_refusal_raises_the_servers_error() -> None:
    refusal = b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds"}}'
    with pytest.raises(nats.js.errors.BadRequestError) as caught:
        stored_at(Reply(refusal, None), "w")
    assert caught.value.err_code == 10054 and "size" in str(caught.value.description)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"stream":"s"}', b'{"seq":"4"}',
                                  b'{"seq":true}', b'"text"'])
def test_anything_else_is_a_bus_error_naming_the_write(body: bytes) -> None:
    with pytest.raises(BusError, match=r"^w: not an acknowledgement") as caught:
        stored_at(Reply(body, None), "w")
    assert not isinstance(caught.value, ConnectionFailed)


def test_a_status_without_a_body_is_a_lost_connection() -> None:
    with pytest.raises(ConnectionFailed, match="no JetStream answering"):
        stored_at(Reply(b"", b"NATS/1.0 408 Request Timeout\r\n\r\n"), "w")
