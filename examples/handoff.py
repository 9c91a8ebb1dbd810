"""A two-agent handoff: a triage agent delegates to a billing agent in the same session.

Run it (one command; it starts its own embedded nats-server)::

    python examples/handoff.py

``triage`` answers general questions itself. A question about money it
hands off: it replies into the session with the billing agent as the
audience (``EV_DELEGATE``), and ``billing`` answers the user directly. Each
reply names its cause (``causation_id``), and the bus sets the delegation
depth from it: the user's message is depth 0, the handoff 1, billing's
answer 2. The session's ``max_depth`` bounds such chains.

Both agents are worker groups; here each has one worker in this process,
in production any number of worker processes on any nodes::

    sessionbus worker examples.handoff:triage --group triage
    sessionbus worker examples.handoff:billing --group billing
"""

from __future__ import annotations

import asyncio

from sessionbus.bus import SessionBus
from sessionbus.schemas import EV_DELEGATE, EV_TEXT, Envelope
from sessionbus.workers import Turn, Worker

TRIAGE = "triage"
BILLING = "billing"
USER = "user"
_MONEY = ("invoice", "refund", "charge", "bill", "payment")


async def triage(turn: Turn) -> None:
    """Answer general questions; hand anything about money to billing."""
    envelope = turn.envelope
    if envelope.event_type != EV_TEXT:
        return
    text = envelope.content
    if any(word in text.lower() for word in _MONEY):
        await turn.reply(
            f"handing over to {BILLING}", audience=[BILLING], event_type=EV_DELEGATE,
            event_data={"text": text, "reply_to": envelope.sender_id},
        )
    else:
        await turn.reply(f"happy to help with {text!r}",
                         audience=[envelope.sender_id])


async def billing(turn: Turn) -> None:
    """Answer what triage delegated, straight to the user who asked."""
    envelope = turn.envelope
    if envelope.event_type != EV_DELEGATE:
        return
    asker = str(envelope.event_data.get("reply_to") or USER)
    question = envelope.event_data.get("text", "")
    await turn.reply(f"I looked into {question!r}: a refund is on its way",
                     audience=[asker])


def show(envelope: Envelope) -> str:
    """One line of the conversation."""
    audience = ",".join(envelope.audience or ("everyone",))
    body = envelope.content or envelope.event_data.get("text", "")
    return (f"  depth {envelope.depth}  {envelope.sender_id:>7} -> {audience:<8} "
            f"[{envelope.event_type}] {body}")


async def main() -> None:
    """Start both agents, ask two questions, print the whole conversation."""
    async with SessionBus() as sb:  # no URL: an embedded nats-server
        for group, handler in ((TRIAGE, triage), (BILLING, billing)):
            await Worker(sb, group=group, handler=handler).start()
        session = await sb.open(participants=[USER, TRIAGE, BILLING], participant=USER)
        async with session.live(USER) as replies:
            for question in ("what are your opening hours?", "I want a refund for invoice 42"):
                await session.send(question, audience=[TRIAGE])
                async with asyncio.timeout(30):
                    answer = await anext(replies)
                print(f"{USER}: {question}\n{answer.sender_id}: {answer.content}\n")
        print("the session, as stored:")
        async for envelope in session.history():
            print(show(envelope))
        await session.close("done")


if __name__ == "__main__":
    asyncio.run(main())
