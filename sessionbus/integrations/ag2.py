"""AG2 on the bus: :class:`NatsStorage` (history) and :class:`SessionStore` (MCP sessions).

Install with ``pip install 'sessionbus[ag2]'`` (ag2 1.2.x with its ``mcp``
extra). Swapping AG2's in-process pieces for these makes an MCP server of
several replicas share its conversations::

    from sessionbus.integrations.ag2 import NatsStorage, SessionStore

    store = SessionStore(servers="nats://nats:4222", ttl=900)   # was ag2.mcp.sessions
    stream = MemoryStream(NatsStorage("nats://nats:4222"))      # any AG2 stream's history

:class:`NatsStorage` needs only ``ag2``; :class:`SessionStore` needs
``ag2.mcp`` (``ag2[mcp]``, which requires ``mcp>=2.2``), imported when the
name is first used. The core packages never import ag2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import ag2  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sessionbus.integrations.ag2 needs ag2 1.2.x: pip install 'sessionbus[ag2]'"
    ) from e

from sessionbus.integrations._ag2_storage import NatsStorage

if TYPE_CHECKING:
    from sessionbus.integrations._ag2_sessions import SessionStore

__all__ = ["NatsStorage", "SessionStore"]


def __getattr__(name: str) -> Any:
    if name == "SessionStore":
        from sessionbus.integrations._ag2_sessions import SessionStore

        return SessionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
