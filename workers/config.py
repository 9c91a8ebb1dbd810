"""Timing and sizing of the worker runtime, in one frozen object.

The timings are tied together by how nats-server moves a pinned consumer
(measured on 2.15.1):

* the server moves the pin once the holder has sent no pull *request*
  for ``priority_timeout``; a pull still waiting does not count, so a
  worker pulls at least every ``poll_interval``;
* messages a dead holder kept are redelivered ``ack_wait`` after the last
  ``in_progress`` it sent, and the server does not wait for them before
  pinning the next puller (not even on unpin): if the pin moved first, the
  new owner would get a session's later envelopes before its earlier ones.
  Hence ``ack_wait + poll_interval < priority_timeout``, with room to spare
  for a busy event loop;
* a dead worker's lease disappears ``lease_ttl`` (whole seconds) after its
  last refresh, when the others start pulling its partitions; they get
  messages once its pin has lapsed. Its partitions move within
  :attr:`WorkerConfig.failover_bound` seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sessionbus.bus._kv import wire_ttl
from sessionbus.bus.errors import ConfigError
from sessionbus.bus.settings import check_int

__all__ = ["WorkerConfig"]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a :class:`~sessionbus.workers.Worker` paces leases, pulls, acks and shutdown.

    The defaults suit production: a dead worker's partitions move within
    about 14 s. Tests use shorter timings (``lease_ttl=2, ack_wait=1,
    poll_interval=0.5, priority_timeout=2.5``: about 5.5 s).
    """

    #: Seconds a worker's lease lives without a refresh (refreshed every third).
    lease_ttl: float = 5.0
    #: Seconds the server waits for an ack or ``in_progress`` before redelivering.
    ack_wait: float = 3.0
    #: Seconds without a pull request after which the server moves a partition's pin.
    priority_timeout: float = 8.0
    #: Longest a pull request waits for messages; also the keep-alive pull pace.
    poll_interval: float = 2.0
    #: Most messages asked for in one pull.
    fetch_batch: int = 256
    #: Messages the server lets one partition's owner hold unacked.
    max_ack_pending: int = 1024
    #: Messages the worker holds (queued or running) before it slows pulls to keep-alives.
    max_held: int = 8192
    #: First retry delay after a handler failure, doubled per attempt.
    retry_backoff: float = 0.5
    #: Longest retry delay.
    retry_backoff_max: float = 30.0
    #: Seconds :meth:`Worker.drain` lets running turns finish before cancelling them.
    drain_timeout: float = 30.0
    #: Seconds a partition moving to another worker waits for its running turns.
    handover_timeout: float = 30.0
    #: Sessions whose last completed stream sequence is remembered for dedupe.
    dedupe_size: int = 65_536
    #: Write a completion record per settled turn, so a completed turn whose ack a
    #: server crash or a worker pause lost is not run again after its successor.
    #: False saves one JetStream write per turn; such a turn may then re-run late.
    completion_records: bool = True
    #: Seconds a session's completion record lasts after its last turn settled.
    completion_ttl: float = 24 * 3600.0
    #: Envelopes of one session kept for ``turn.history()`` (0: read the stream each time).
    history_per_session: int = 2048
    #: Envelopes kept for ``turn.history()`` over all sessions (least recently used go).
    history_total: int = 32_768

    def __post_init__(self) -> None:
        if not isinstance(self.completion_records, bool):
            raise ConfigError(f"completion_records must be a bool, got {self.completion_records!r}")
        for name in ("history_per_session", "history_total"):
            check_int(getattr(self, name), name, least=0)
        for name in ("lease_ttl", "ack_wait", "priority_timeout", "poll_interval",
                     "retry_backoff", "retry_backoff_max", "drain_timeout",
                     "handover_timeout", "completion_ttl"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("fetch_batch", "max_ack_pending", "max_held", "dedupe_size"):
            check_int(getattr(self, name), name, least=1)
        if not self.ack_wait + self.poll_interval < self.priority_timeout:
            raise ConfigError(
                f"ack_wait ({self.ack_wait}s) + poll_interval ({self.poll_interval}s) must be "
                f"shorter than priority_timeout ({self.priority_timeout}s), or a failover "
                "redelivers a session's envelopes out of order"
            )
        if self.lease_ttl < 1:
            raise ConfigError(f"lease_ttl must be >= 1 s (the server counts whole seconds), "
                              f"got {self.lease_ttl}")

    @property
    def touch_interval(self) -> float:
        """How often held messages are checked for an ``in_progress``.

        A held message gets its first one at an age of at most
        ``touch_after + touch_interval`` (0.46 ``ack_wait``): the event loop
        may then stall for the remaining half of ``ack_wait`` (1.6 s at the
        defaults) before the server redelivers to a live worker. A check
        costs a pass over the sessions held, a fraction of a millisecond.
        """
        return self.ack_wait / 8

    @property
    def touch_after(self) -> float:
        """Age after which a held message gets an ``in_progress``."""
        return self.ack_wait / 3

    @property
    def refresh_interval(self) -> float:
        """How often the lease is refreshed."""
        return wire_ttl(self.lease_ttl) / 3

    @property
    def fence_after(self) -> float:
        """Seconds without the server's word after which a worker drops its partitions' turns.

        A worker whose event loop stalled (SIGSTOP, a long GC, a VM freeze)
        or whose pulls got no answer from the server (a cut or partitioned
        link) for this long cancels the turns of the partitions concerned,
        stores none of their replies and acks nothing of theirs, and takes
        the partitions again from scratch. It lies halfway between
        ``ack_wait`` and ``priority_timeout - poll_interval``, the earliest
        a successor can be pinned, so a stale turn stops before a successor
        can start the session's envelope (once its loop runs again).
        """
        return (self.ack_wait + self.priority_timeout - self.poll_interval) / 2

    @property
    def failover_bound(self) -> float:
        """Seconds within which a dead worker's partitions are pulled by another.

        The lease's TTL (whole seconds, plus up to one for the server's
        expiry sweep) and then the pin's ``priority_timeout`` counted from
        the dead worker's last pull, whichever ends later; the sum is a
        safe upper bound.
        """
        return wire_ttl(self.lease_ttl) + 1.0 + self.priority_timeout

    def replace(self, **changes: Any) -> WorkerConfig:
        """A copy with ``changes`` applied and validated."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as e:
            raise ConfigError(str(e)) from e
