"""An echo agent: it answers every text sent to it with the same text.

Run it (one command; it starts its own embedded nats-server)::

    python examples/echo.py

It opens a session, runs an ``echo`` worker in this process, sends three
messages as ``user``, prints each reply, closes the session and exits.

The same handler serves a real deployment (docker-compose.yml does this)::

    sessionbus worker examples.echo:handle --group echo
    sessionbus sessions open chat-1 --participant user --participant echo
    sessionbus send chat-1 "hello" --wait 5
"""

from __future__ import annotations

import asyncio

from sessionbus.bus import SessionBus
from sessionbus.schemas import EV_TEXT
from sessionbus.workers import Turn, Worker

#: The worker group, and the participant id its replies are sent as.
AGENT = "echo"


async def handle(turn: Turn) -> None:
    """Reply to the sender with the envelope's text."""
    envelope = turn.envelope
    # The worker hands over only envelopes addressed to this agent (never
    # its own replies); answer the text ones.
    if envelope.event_type != EV_TEXT:
        return
    await turn.reply(f"echo: {envelope.content}", audience=[envelope.sender_id])


async def main() -> None:
    """Start a bus and a worker, chat a little, print the replies."""
    async with SessionBus() as sb:  # no URL: an embedded nats-server
        worker = Worker(sb, group=AGENT, handler=handle)
        await worker.start()  # stopped when the bus closes
        session = await sb.open(participants=["user", AGENT], participant="user")
        async with session.live("user") as replies:  # open before sending
            for text in ("hello", "is anyone there?", "bye"):
                await session.send(text, audience=[AGENT])
                async with asyncio.timeout(30):
                    reply = await anext(replies)
                print(f"user -> {AGENT}: {text}")
                print(f"{reply.sender_id} -> user: {reply.content}")
        await session.close("done")


if __name__ == "__main__":
    asyncio.run(main())
