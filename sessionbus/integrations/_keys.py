"""Keys of any characters as NATS subject tokens, and back.

A key's ``/``-separated segments become ``.``-separated tokens: a plain
segment (``[A-Za-z0-9_-]+``) is kept as it is, any other (empty, with dots,
spaces, wildcards, non-ASCII) is base64url-encoded behind ``=``. So a key
never splits a subject or becomes a wildcard, and a prefix of whole
segments is a subject filter the server can evaluate.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["decode_key", "encode_key", "token", "untoken"]

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")


def token(segment: str) -> str:
    """One segment as a subject token."""
    if _PLAIN.fullmatch(segment):
        return segment
    raw = base64.urlsafe_b64encode(segment.encode()).rstrip(b"=").decode()
    return "=" + raw


def untoken(token: str) -> str:
    """The segment a token holds (binascii.Error / UnicodeDecodeError if malformed)."""
    if not token.startswith("="):
        return token
    body = token[1:]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def encode_key(key: str) -> str:
    """The bucket key (dot-separated tokens) a store key is kept under."""
    if not isinstance(key, str):
        raise TypeError(f"a key must be a str, not {type(key).__name__}")
    return ".".join(token(s) for s in key.split("/"))


def decode_key(stored: str) -> str:
    """The store key a bucket key holds; ValueError if it is not one of ours."""
    try:
        return "/".join(untoken(t) for t in stored.split("."))
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(f"not a store key: {stored!r}") from e
