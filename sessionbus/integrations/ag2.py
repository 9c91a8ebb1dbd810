"""AG2 on the bus: :class:`NatsStorage` (history) and :class:`SessionStore` (MCP sessions).

Install with ``pip install 'sessionbus[ag2]'`` (ag2 1.2.x with its ``mcp``
extra). Swapping AG2's in-process pieces for these makes an MCP server of
several replicas share its conversations::

    from sessionbus.integrations.ag2 import NatsStorage, SessionStore

    server = MCPServer(agent)
    use_session_store(server, SessionStore(servers="nats://nats:4222", ttl=900))
    executor = AgentExecutor(agent, session_store=SessionStore(...))  # the public argument
    stream = MemoryStream(NatsStorage("nats://nats:4222"))  # any AG2 stream's history

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

__all__ = ["NatsStorage", "SessionStore", "use_session_store"]


def use_session_store(server: Any, store: SessionStore) -> None:
    """Make an ``ag2.mcp.MCPServer`` (ag2 1.2.x) serve its conversations from ``store``.

    ``MCPServer`` builds its own in-process store from ``sessions=``; this
    puts ``store`` in its place before the server runs, with the server's
    paused-run cleanup as the store's ``on_evict`` (as MCPServer does for
    its own), so handles and the turn lock work across replicas. The
    conversation bounds advertised in the tool description are the ones
    the server was built with: build it with ``sessions=SessionConfig(...)``
    carrying the same ``max_sessions`` and ``ttl`` as ``store``.
    """
    executor = getattr(server, "_executor", None)
    paused = getattr(server, "_paused_runs", None)
    if executor is None or paused is None or not hasattr(executor, "_session_store"):
        raise TypeError(
            f"{type(server).__name__} is not an ag2 1.2 MCPServer this helper knows how to "
            "equip; pass the store to AgentExecutor(session_store=...) instead"
        )
    server._session_store = store
    executor._session_store = store
    store.on_evict = paused.discard_conversation


def __getattr__(name: str) -> Any:
    if name == "SessionStore":
        from sessionbus.integrations._ag2_sessions import SessionStore

        return SessionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
