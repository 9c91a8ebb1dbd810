"""The registry's stored record: a :class:`~sessionbus.schemas.SessionInfo` plus its exact expiry.

A record is the codec's msgpack map of the SessionInfo fields and
``expires_at``, the writer's wall-clock time at which the record stops
counting. The server's TTL is whole seconds (rounded up), so readers check
``expires_at`` themselves: a record written with a 0.5 s TTL reads as absent
after 0.5 s even though the server drops it only at the next whole second.
Readers on other machines compare against their own clock, so clock skew
between nodes shifts expiry by that much.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic import ValidationError
from sessionbus.bus.errors import CorruptRecord, InvalidMetrics
from sessionbus.schemas.codec import decode_map
from sessionbus.schemas.errors import DecodeError
from sessionbus.schemas.session import MetricValue, SessionInfo

Metrics = dict[str, MetricValue]


class ExpiredSession(NamedTuple):
    """A registry record whose TTL ran out, as :meth:`SessionRegistry.expired` yields it."""

    call_id: str
    session_id: str

#: msgpack integers are at most 64 bits wide.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def validate_metrics(metrics: object) -> Metrics:
    """Return a copy of ``metrics`` if it is a dict of str -> int | float | None.

    Raises :class:`InvalidMetrics` before any I/O otherwise: a bool is not a
    metric (it is an int to Python, not to readers in other languages), nor
    is an int wider than 64 bits (msgpack cannot carry it).
    """
    if not isinstance(metrics, Mapping):
        raise InvalidMetrics(metrics, f"must be a dict, not {type(metrics).__name__}")
    out: Metrics = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise InvalidMetrics(metrics, f"name {name!r} is not a str")
        if value is None or (isinstance(value, float) and not isinstance(value, bool)):
            out[name] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            if not _INT_MIN <= value <= _INT_MAX:
                raise InvalidMetrics(metrics, f"{name!r} = {value} does not fit in 64 bits")
            out[name] = value
        else:
            raise InvalidMetrics(
                metrics, f"{name!r} is a {type(value).__name__}, not int, float or None"
            )
    return out


def decode_record(key: str, raw: bytes) -> tuple[SessionInfo, dict[str, Any]]:
    """The SessionInfo in ``raw`` and the whole stored map; CorruptRecord if it is not one."""
    try:
        body = decode_map(raw)
    except DecodeError as e:
        raise CorruptRecord(key, e.reason, raw) from e
    try:
        info = SessionInfo.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise CorruptRecord(key, f"{where}: {first.get('msg')}", raw) from e
    if expires_at(body) is None:
        raise CorruptRecord(key, "expires_at is missing or not a finite number", raw)
    return info, body


def expires_at(body: Mapping[str, Any]) -> float | None:
    """The record's ``expires_at``, None if it has no valid one."""
    value = body.get("expires_at")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def is_alive(body: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether the record's ``expires_at`` is still ahead of ``now`` (default: the clock)."""
    deadline = expires_at(body)
    return deadline is not None and deadline > (time.time() if now is None else now)


def check_names(key: str, info: SessionInfo, call_id: str, session_id: str, raw: bytes
                ) -> None:
    """Raise CorruptRecord unless the record stored under ``key`` names that session."""
    if info.call_id != call_id or info.session_id != session_id:
        raise CorruptRecord(key, "the record names another session", raw)
