"""A server paused until the client logs that it gave up waiting, for unanswered-write tests."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsCluster, NatsServer
from waiting import sigstop


class _ResumeOn(logging.Handler):
    def __init__(self, pid: int, text: str) -> None:
        super().__init__()
        self.pid, self.text, self.resumed = pid, text, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.resumed and self.text in record.getMessage():
            self.resumed = True
            os.kill(self.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def paused_until_logged(server: NatsServer, text: str) -> AsyncIterator[_ResumeOn]:
    """SIGSTOP ``server``, and SIGCONT it once a sessionbus log line contains ``text``.

    Returns once every thread of the server has stopped. What a client
    writes meanwhile waits in the server's socket: once resumed, the
    server stores it and answers a request the client stopped waiting
    for, then takes the client's next attempt. So a write is stored with
    its answer lost, in that order, on a real server.
    """
    assert server.pid is not None
    handler = _ResumeOn(server.pid, text)
    root = logging.getLogger("sessionbus")
    root.addHandler(handler)
    try:
        await sigstop(server.pid)
        yield handler
    finally:
        root.removeHandler(handler)
        os.kill(server.pid, signal.SIGCONT)


async def stream_leader(cluster: NatsCluster, bus: SessionBus,
                        stream: str) -> tuple[NatsServer, NatsServer]:
    """The node of ``cluster`` leading ``stream``, and another node."""
    info = await bus.js.stream_info(stream)
    assert info.cluster is not None
    leader = next(s for s in cluster.servers if s.name == info.cluster.leader)
    return leader, next(s for s in cluster.servers if s is not leader)
