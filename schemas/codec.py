"""The wire codec: msgpack with a format version.

Every value on the wire is a two-element msgpack array ``[version, body]``.
Readers reject versions they do not know instead of guessing, and every
failure raises :class:`DecodeError` carrying the raw bytes.

A field missing from a body reads as its default. An envelope is written
without the fields that hold their constant default (no audience, no
causation, depth 0, ...; never its id or creation time, whose defaults
are made fresh): a typical envelope carries 4 or 5 of its 13 fields, a
third fewer bytes, and decodes in two thirds of the time. Every version of
this codec reads both forms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError
from sessionbus.schemas.envelope import Envelope
from sessionbus.schemas.errors import DecodeError, EncodeError

#: The format version written by this codec.
FORMAT_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset({FORMAT_VERSION})

M = TypeVar("M", bound=BaseModel)

_unpackb = msgpack.unpackb
#: Each model's validator: model_validate() with its defaults, minus a wrapper
#: and an attribute lookup that cost a sixth of a worker's decode of an envelope.
#: The wire models are complete at import and never rebuilt afterwards.
_validators: dict[type[BaseModel], Callable[[Any], Any]] = {}

#: Envelope fields with a constant default (or an empty dict), and that default:
#: left out of an envelope's body when they hold it.
_ENVELOPE_DEFAULTS: tuple[tuple[str, Any], ...] = tuple(
    (name, field.get_default(call_default_factory=True))
    for name, field in Envelope.model_fields.items()
    if not field.is_required() and field.default_factory in (None, dict)
)


def encode(value: BaseModel | dict[str, Any]) -> bytes:
    """Encode a model or a mapping as ``[FORMAT_VERSION, body]``."""
    try:
        # pydantic refuses a too deeply nested value with a plain ValueError.
        body = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        if type(value) is Envelope:
            for name, default in _ENVELOPE_DEFAULTS:
                if body[name] == default:
                    del body[name]
        packed: bytes = msgpack.packb([FORMAT_VERSION, body], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"cannot encode {type(value).__name__}: {e}") from e
    return packed


def decode_map(raw: bytes) -> dict[str, Any]:
    """Decode wire bytes into the mapping they carry."""
    try:
        obj = _unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise DecodeError(f"not msgpack: {e}", raw) from e
    return _body(obj, raw)


def _body(obj: Any, raw: bytes) -> dict[str, Any]:
    """The body of a decoded ``[version, body]`` pair; DecodeError for anything else."""
    if not (isinstance(obj, list) and len(obj) == 2):
        raise DecodeError("not a [version, body] pair", raw)
    version, body = obj
    if not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        raise DecodeError(f"unsupported format version {version!r}", raw)
    if not isinstance(body, dict):
        raise DecodeError("body is not a map", raw)
    return body


def decode(raw: bytes, model: type[M]) -> M:
    """Decode wire bytes and validate them as ``model``."""
    try:
        obj = _unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise DecodeError(f"not msgpack: {e}", raw) from e
    # What this codec writes, checked in one expression (a worker decodes
    # every envelope it takes); anything else goes through _body's checks.
    if (type(obj) is list and len(obj) == 2 and type(obj[0]) is int
            and obj[0] in SUPPORTED_VERSIONS and type(obj[1]) is dict):
        body = obj[1]
    else:
        body = _body(obj, raw)
    validate = _validators.get(model)
    if validate is None:
        validate = _validators[model] = model.__pydantic_validator__.validate_python
    try:
        return validate(body)  # type: ignore[no-any-return]
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise DecodeError(f"invalid {model.__name__}: {where}: {first.get('msg')}", raw) from e
