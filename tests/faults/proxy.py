"""A TCP proxy on loopback that can cut a link and restore it, for fault tests.

It runs on its own event loop in a background thread, so the test's (or a
benchmark's) event loop being busy never delays the bytes it forwards, and
it can be driven from synchronous code::

    with LinkProxy(target_port=hub.leaf_listen_port) as proxy:
        url = f"nats-leaf://127.0.0.1:{proxy.port}"
        ...
        proxy.cut()        # close every live connection, refuse new ones
        proxy.restore()    # accept again

While cut, new connections are accepted and closed at once (a refused
link, as when the far side is unreachable); the listening port is kept so
that the address never changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

__all__ = ["LinkProxy"]

_CHUNK = 64 * 1024


class LinkProxy:
    """Forward ``127.0.0.1:port`` to ``target_host:target_port`` until cut."""

    def __init__(self, *, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self.refused = 0
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        """``nats://`` URL of the proxy's listening side."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        """Whether the link is cut."""
        return self._cut

    def start(self) -> LinkProxy:
        """Listen on a free loopback port; return once accepting."""
        self._thread = threading.Thread(target=self._run, name="link-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            loop.run_forever()
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _call(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``fn`` (a coroutine function) on the proxy's loop and wait for it."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout=10)

    def cut(self) -> None:
        """Close every live connection (both directions) and refuse new ones."""
        async def do() -> None:
            self._cut = True
            for w in list(self._writers):
                _abort(w)
            self._writers.clear()
        self._call(do)

    def restore(self) -> None:
        """Accept and forward new connections again."""
        async def do() -> None:
            self._cut = False
        self._call(do)

    def stop(self) -> None:
        """Close everything and stop the proxy's thread."""
        if self._loop is None or self._thread is None:
            return
        async def do() -> None:
            self._cut = True
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                _abort(w)
            self._writers.clear()
        with contextlib.suppress(Exception):
            self._call(do)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host,
                                                                  self.target_port)
        except OSError:
            self.refused += 1
            _abort(writer)
            return
        if self._cut:  # cut while connecting
            self.refused += 1
            _abort(writer)
            _abort(up_writer)
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                _abort(w)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once (RST, no lingering data): a cut link, not a polite shutdown."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
