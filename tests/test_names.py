"""Subject and key naming: hostile ids never split a subject or become a wildcard."""

from __future__ import annotations

import re

import pytest
from sessionbus.bus._names import MAX_ID_BYTES, Names, decode_token, encode_token, fnv1a_32
from sessionbus.bus.errors import InvalidIdError

HOSTILE = ["a.b", "*", ">", "a b", "tab\there", "ünïcødé-会话", "=looks-encoded", "x" * 1024,
           "é" * 512, "a/b", "$KV", "", "\x00"]
TOKEN = re.compile(r"[A-Za-z0-9_=-]+")


@pytest.mark.parametrize("value", [h for h in HOSTILE if h])
def test_tokens_are_safe_and_reversible(value: str) -> None:
    token = encode_token(value)
    assert TOKEN.fullmatch(token), token
    assert decode_token(token) == value


def test_plain_ids_stay_readable() -> None:
    assert encode_token("call_123-abc") == "call_123-abc"


def test_distinct_ids_never_share_a_token() -> None:
    tokens = {encode_token(v) for v in HOSTILE if v}
    assert len(tokens) == len([v for v in HOSTILE if v])


@pytest.mark.parametrize("bad", ["", "x" * (MAX_ID_BYTES + 1), "é" * 513, 5, None, "\ud800"])
def test_bad_ids_raise_typed_error(bad: object) -> None:
    with pytest.raises(InvalidIdError) as info:
        encode_token(bad)  # type: ignore[arg-type]
    assert info.value.kind == "session id"


@pytest.mark.parametrize("prefix", ["", "a.b", "*", "1abc", "x" * 40, "a b"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(InvalidIdError):
        Names(prefix)


def test_subjects_have_fixed_token_counts() -> None:
    names = Names("sb")
    for sid in [h for h in HOSTILE if h]:
        assert names.inbound(sid).count(".") == 2
        assert names.closed(sid).count(".") == 3
        assert names.registry_key(sid, sid).count(".") == 1
        assert names.stored(sid, 64).split(".")[3] == encode_token(sid)


def test_fnv1a_known_vector() -> None:
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
