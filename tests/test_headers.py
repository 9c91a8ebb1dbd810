"""The header parser SessionBus installs in nats-py returns what nats-py's own returns."""

from __future__ import annotations

import random

from nats.aio.client import Client
from sessionbus.bus import SessionBus
from sessionbus.bus._headers import parse_header_lines

# nats-py's parser as shipped, kept by the time this module is imported (before
# any SessionBus is built in this test process, the plugin builds none).
_ORIGINAL = Client.__dict__["_parse_header_lines"].__func__


def test_same_result_as_nats_py_on_every_ascii_character_and_random_blocks() -> None:
    for code in range(256):
        c = bytes([code])
        for block in (b"N" + c + b"ame: v\r\n", c + b": v\r\n", b"Name: " + c + b"v" + c + b"\r\n",
                      b"Name:" + c + b"\r\nB: 2\r\n"):
            assert parse_header_lines(block) == _ORIGINAL(block), block
    rng = random.Random(7)
    alphabet = b"ab:-\r\n \t\x0b\x0c\x1c\x1f\xc3\xa9\xff\xe2\x82\xac\x85\xa0"
    for _ in range(20000):
        block = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert parse_header_lines(block) == _ORIGINAL(block), block
    real = (b"Nats-Stream: S\r\nNats-Subject: sb.p.3.abc\r\nNats-Sequence: 42\r\n"
            b"Nats-Time-Stamp: 2026-11-30T15:02:24.729135257Z\r\nNats-Msg-Id: x\r\n\r\n")
    assert parse_header_lines(real) == _ORIGINAL(real)
    assert parse_header_lines(real)["Nats-Sequence"] == "42"


def test_a_bus_installs_it() -> None:
    SessionBus("nats://127.0.0.1:1")
    assert Client._parse_header_lines is parse_header_lines
