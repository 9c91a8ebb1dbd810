"""Every id has exactly one subject token: decoding refuses aliases and garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sessionbus.bus._names import MAX_ID_BYTES, decode_token, encode_token
from sessionbus.bus.errors import InvalidIdError

#: Any valid id: non-empty unicode without lone surrogates, at most MAX_ID_BYTES in UTF-8.
ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64).filter(
    lambda s: len(s.encode("utf-8")) <= MAX_ID_BYTES
)
plain_ids = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)
tokens = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=0, max_size=24)


@settings(max_examples=400, deadline=None)
@given(st.one_of(ids, plain_ids))
def test_encode_then_decode_is_the_identity(value: str) -> None:
    assert decode_token(encode_token(value)) == value


@settings(max_examples=500, deadline=None)
@given(st.one_of(tokens, st.builds(lambda b: "=" + b, tokens)))
def test_decode_accepts_only_canonical_tokens(token: str) -> None:
    try:
        value = decode_token(token)
    except InvalidIdError:
        return
    assert encode_token(value) == token  # one token per id: the decoder is injective


@pytest.mark.parametrize("alias", [
    "=YS5i!!",   # 'a.b' with junk after the base64 body
    "=!!",       # decoded to '' before
    "=",         # empty body
    "=YWJj",     # 'abc' is plain: its only token is 'abc'
    "=YR",       # 'a' with non-zero trailing bits ('=YQ' is canonical... and still plain)
    "=YS5iY",    # impossible base64 length
    "=YS5i==",   # padding
    "=YS5i.x",   # two tokens
    "=gA",       # not UTF-8
])
def test_known_aliases_are_refused(alias: str) -> None:
    with pytest.raises(InvalidIdError):
        decode_token(alias)


def test_the_canonical_token_of_a_dotted_id_still_decodes() -> None:
    assert encode_token("a.b") == "=YS5i"
    assert decode_token("=YS5i") == "a.b"
