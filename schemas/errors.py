"""The root of every error sessionbus raises, and the codec's errors.

The whole tree is drawn in :mod:`sessionbus.bus.errors`; the part that lives here is
the part ``schemas`` needs without importing anything else of ours::

    BusError
     └── CodecError (ValueError)
          ├── EncodeError
          └── DecodeError      .raw carries the bytes that failed
"""

from __future__ import annotations


class BusError(Exception):
    """Root of every error raised by sessionbus."""


class CodecError(BusError, ValueError):
    """A value could not be turned into wire bytes or back."""


class EncodeError(CodecError):
    """A value could not be encoded for the wire."""


class DecodeError(CodecError):
    """Wire bytes could not be decoded.

    ``raw`` holds the bytes exactly as received, so a caller can log or
    dead-letter them; ``reason`` says what was wrong with them.
    """

    def __init__(self, reason: str, raw: bytes) -> None:
        self.reason = reason
        self.raw = raw
        preview = raw[:32].hex()
        super().__init__(f"cannot decode {len(raw)} bytes ({reason}); first bytes: {preview}")
