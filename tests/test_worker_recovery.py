"""A partition whose pulls nobody answers is recreated at a bounded pace, not in a loop."""

from __future__ import annotations

import logging
import time

import pytest
from sessionbus.bus._server import NatsServer
from sessionbus.workers import Turn, Worker
from sessionbus.workers._partition import recovery_pause
from waiting import until
from worker_proc import FAST

from sessionbus.testing import BusFactory, ServerFactory

#: Pulls go nowhere ("no responders") while every other API call works: what a
#: replicated consumer looks like to a worker while its stream has no leader.
_NO_PULLS = 'mappings = { "$JS.API.CONSUMER.MSG.NEXT.>": "nowhere.>" }'


async def test_a_consumer_whose_pulls_nobody_answers_is_recreated_at_a_pace(
    nats_server_factory: ServerFactory, bus_factory: BusFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server: NatsServer = nats_server_factory(extra_config=_NO_PULLS)
    sb = await bus_factory(server.url, prefix="np", partitions=1)

    async def handle(turn: Turn) -> None:
        pass

    def attempts() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "sessionbus.workers._partition"
                and ("the consumer is gone" in r.getMessage()
                     or "still not answering" in r.getMessage())]

    caplog.set_level(logging.DEBUG, logger="sessionbus.workers._partition")
    worker = Worker(sb, group="g", handler=handle, config=FAST)
    start = time.monotonic()
    await worker.start()
    try:
        # Each pull fails at once and each recreation succeeds at once.
        await until(lambda: len(attempts()) >= 5, "five attempts to recreate the consumer")
        elapsed = time.monotonic() - start
    finally:
        await worker.stop()
    # 0.05 s before the second attempt, then twice as long each time (the
    # fifth is logged as its wait begins).
    assert elapsed >= 0.05 + 0.1 + 0.2, f"five recreations in {elapsed:.3f}s"
    errors = [r for r in attempts() if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # one error an episode, the rest at debug level
    assert "503" in errors[0].getMessage()


def test_the_pause_doubles_to_its_cap_however_long_the_episode() -> None:
    pauses = [recovery_pause(n) for n in range(1, 9)]
    assert pauses == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    # An outage of hours: thousands of attempts in a row.
    assert recovery_pause(10_000) == recovery_pause(10**9) == 1.0
