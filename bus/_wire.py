"""Reading the NATS protocol off a bus connection, and routing deliveries as raw bytes.

nats-py's protocol parser (``nats.protocol.parser.Parser.parse``) tries
up to three regular expressions on every control line, stores each
message's arguments in a dict, deletes every message from the front of
its buffer one at a time, and awaits a coroutine per delivery
(``Client._process_msg``). A bus reads thousands of deliveries a second
on a worker, and a thousand at once on a cold history read.

:func:`install` replaces the ``parse`` method of one client's parser
with a loop over an immutable copy of what was read: it finds the end of a
``MSG``/``HMSG`` line with one search, splits its arguments, and when the
whole payload is at hand cuts it out (one copy) and hands the message over
without touching the parser's state; only the part of a message still to
come is kept, in the parser's buffer, for the next read (a long payload
is not copied again until all of it is there). It keeps the same state
fields as nats-py's parser (``buf``, ``state``, ``needed``,
``header_needed``, ``msg_arg``), so a reset on reconnect works as before,
and it hands every other operation (``PING``, ``PONG``, ``+OK``,
``-ERR``, ``INFO``, or anything it does not know) to nats-py's own
parser, one complete line at a time, so those behave as nats-py makes
them. Two differences, for lines no server sends: an unknown line past
nats-py's 4 KB limit is a protocol error, where nats-py waits for more of
it for good; and so is an ``HMSG`` whose header size exceeds its total
size. On the 1,002 deliveries of a cold 1,000-envelope history read, as
read off the socket, it takes 1.4 µs per message, routing included, where
this module's earlier parser took 2.0 and nats-py's own takes 2.4 before
it builds anything (2-core machine, Python 3.11).

Deliveries to a subscription routed with :func:`routes` are handed to
their ``deliver(subject, reply, data, headers)`` function right there,
synchronously, as bytes (``bus._rawsub``); every other delivery goes to
``Client._process_msg`` unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.errors import ProtocolError
from nats.protocol import parser as nats_parser

__all__ = ["Deliver", "install", "installed", "routes"]

#: ``deliver(subject, reply, data, headers)``, in the client's read loop.
Deliver = Callable[[bytes, bytes, bytes, bytes | None], None]

_CONTROL = nats_parser.AWAITING_CONTROL_LINE
_PAYLOAD = nats_parser.AWAITING_MSG_PAYLOAD
_CRLF = b"\r\n"
_MSG = b"MSG "
_HMSG = b"HMSG "
_ROUTES = "_sessionbus_routes"


def installed(nc: Client) -> bool:
    """Whether :func:`install` put the parser in place on ``nc``."""
    return _ROUTES in nc.__dict__


def routes(nc: Client) -> dict[int, Deliver]:
    """The subscription ids of ``nc`` whose deliveries go, as bytes, to a function.

    Puts the parser in place first if it is not. Add a subscription's
    ``_id`` after subscribing, remove it when unsubscribing.
    """
    install(nc)
    found: dict[int, Deliver] = nc.__dict__[_ROUTES]
    return found


def install(nc: Client) -> None:
    """Read ``nc``'s deliveries with this module's parser (idempotent; before or after connect)."""
    if installed(nc):
        return
    direct: dict[int, Deliver] = {}
    nc.__dict__[_ROUTES] = direct
    ps = nc._ps
    slow: Callable[[bytes], Awaitable[None]] = ps.parse
    stats = nc.stats

    async def parse(data: bytes = b"") -> None:
        buf: bytearray = ps.buf
        resume = ps.state == _PAYLOAD
        if buf:
            buf.extend(data)
            if resume and len(buf) < ps.needed + 2:
                return  # a long payload still on its way: nothing to cut yet
            view = bytes(buf)
        else:
            view = bytes(data)  # the same object when given bytes
        size = len(view)
        pos = 0
        try:
            while True:
                if resume:
                    # A message whose line an earlier read cut: its payload starts here.
                    resume = False
                    args: dict[str, Any] = ps.msg_arg
                    subject: bytes = args["subject"]
                    sid: int = args["sid"]
                    reply: bytes = args["reply"]
                    header_size: int = ps.header_needed
                    needed: int = ps.needed
                    ps.header_needed = 0
                    ps.state = _CONTROL
                    start = pos
                else:
                    end = view.find(_CRLF, pos)
                    if end < 0:
                        return
                    if view.startswith(_HMSG, pos):
                        line_args = view[pos + 5:end].split()
                        if len(line_args) == 5:  # what a JetStream delivery is: inline
                            subject, sid_text, reply, header_text, total = line_args
                            if not (header_text.isdigit() and total.isdigit()):
                                raise ProtocolError("nats: malformed MSG")
                            sid = _sid(sid_text)
                            header_size = int(header_text)
                            needed = int(total)
                            if header_size > needed:
                                raise ProtocolError("nats: malformed MSG")
                        else:
                            subject, sid, reply, header_size, needed = _message_line(
                                line_args, headers=True)
                    elif view.startswith(_MSG, pos):
                        subject, sid, reply, header_size, needed = _message_line(
                            view[pos + 4:end].split(), headers=False)
                    else:
                        # Anything else, one complete line, through nats-py's parser.
                        line = bytearray(view[pos:end + 2])
                        pos = end + 2
                        ps.buf = line
                        try:
                            await slow(b"")
                        finally:
                            if ps.buf is line:
                                ps.buf = buf
                        if line and ps.buf is buf:
                            # nats-py waits for more of a line past its size limit.
                            raise ProtocolError("nats: unknown protocol")
                        if ps.buf is not buf:
                            return  # reset by what the line made the client do
                        # A message line nats-py's expressions take and this loop
                        # does not (``MSG\t...``): its payload follows here.
                        resume = ps.state == _PAYLOAD
                        continue
                    start = end + 2
                stop = start + needed
                if stop + 2 > size:
                    # The payload is still to come: keep the line's arguments for the next read.
                    arg = ps.msg_arg
                    arg["subject"] = subject
                    arg["sid"] = sid
                    arg["reply"] = reply
                    ps.header_needed = header_size
                    ps.needed = needed
                    ps.state = _PAYLOAD
                    pos = start
                    return
                headers: bytes | None = None
                if header_size:
                    headers = view[start:start + header_size]
                    payload = view[start + header_size:stop]
                else:
                    payload = view[start:stop]
                pos = stop + 2
                deliver = direct.get(sid)
                if deliver is not None:
                    stats["in_msgs"] += 1
                    stats["in_bytes"] += len(payload)
                    try:
                        deliver(subject, reply, payload, headers)
                    except Exception as e:  # a handler's bug must not end the read loop
                        await nc._error_cb(e)
                else:
                    await nc._process_msg(sid, subject, reply, payload,
                                          headers)  # type: ignore[arg-type]
                if ps.buf is not buf:
                    return  # reset while the delivery was handled: a reconnect
        finally:
            if ps.buf is buf:
                buf[:] = view[pos:]

    ps.parse = parse  # type: ignore[method-assign]


def _message_line(args: list[bytes], *, headers: bool) -> tuple[bytes, int, bytes, int, int]:
    """Subject, sid, reply, header size and total size of a ``MSG``/``HMSG`` line's arguments.

    ``MSG <subject> <sid> [reply] <size>``, ``HMSG <subject> <sid> [reply]
    <header size> <total size>``: sizes in digits only, as nats-py reads them.
    """
    count = 5 if headers else 4
    n = len(args)
    if not count - 1 <= n <= count or not args[-1].isdigit() or (
            headers and not args[-2].isdigit()):
        raise ProtocolError("nats: malformed MSG")
    sid = _sid(args[1])
    header_size = int(args[-2]) if headers else 0
    needed = int(args[-1])
    if header_size > needed:
        raise ProtocolError("nats: malformed MSG")
    return args[0], sid, args[2] if n == count else b"", header_size, needed


def _sid(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise ProtocolError("nats: malformed MSG") from None
