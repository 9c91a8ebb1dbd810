"""sessionbus client side."""

from bus.core import SessionBus as SessionBus
from bus.feeds import Feed as Feed
from bus.feeds import QueueFeed as QueueFeed
from bus.history import LiveFeed as LiveFeed
from bus.lifecycle import ClosedEvent as ClosedEvent
from bus.lifecycle import Lifecycle as Lifecycle
from bus.session import Interrupt as Interrupt
from bus.session import Session as Session

__all__ = [
    "ClosedEvent",
    "Feed",
    "Interrupt",
    "Lifecycle",
    "LiveFeed",
    "QueueFeed",
    "Session",
    "SessionBus",
]
