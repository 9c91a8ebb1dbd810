"""TurnLock: a session's turn lock as a lease in the locks bucket, across processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sessionbus.bus import _lock as lock_module
from sessionbus.bus._lock import TurnLock, read_lock
from sessionbus.bus._server import NatsServer
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import ConfigError, LockError, LockLost, LockTimeout
from sessionbus.bus.settings import BusSettings

BusFactory = Callable[..., Awaitable[SessionBus]]

# Holds a session's turn lock in a separate process until killed.
_HOLDER = """
import asyncio, sys
from sessionbus.bus.core import SessionBus
from sessionbus.bus._lock import TurnLock

async def main():
    async with SessionBus(sys.argv[1]) as sb:
        lock = TurnLock(sb, sys.argv[2], lease=float(sys.argv[3]))
        await lock.acquire(timeout=10)
        print("held", lock.token, flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def _poll(condition: Callable[[], Any], *, within: float, step: float = 0.02) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)


async def test_acquire_release_and_fencing_tokens_grow(bus: SessionBus) -> None:
    lock = TurnLock(bus, "s1")
    token1 = await lock.acquire()
    assert lock.held
    state = await read_lock(bus, "s1")
    assert state is not None
    assert (state.owner, state.token) == (lock.owner, token1)
    assert state.expires_at > time.time()
    await lock.release()
    assert not lock.held
    assert await read_lock(bus, "s1") is None

    other = TurnLock(bus, "s1")
    token2 = await other.acquire()
    assert token2 > token1
    await other.release()
    # Reacquiring through the release marker (one write) still grows the token.
    token3 = await lock.acquire()
    assert token3 > token2
    await lock.release()


async def test_a_second_holder_waits_and_wakes_on_release(
    nats_server: NatsServer, bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus_a = await bus_factory(nats_server.url)
    bus_b = await bus_factory(nats_server.url)
    # With the poll fallback pushed to a minute, only the watch can wake it.
    monkeypatch.setattr(lock_module, "_MAX_POLL", 60.0)
    first = TurnLock(bus_a, "s1", lease=120)
    second = TurnLock(bus_b, "s1", lease=120)
    await first.acquire()
    waiter = asyncio.create_task(second.acquire(timeout=20))
    await asyncio.sleep(0.3)  # give the waiter time to try and fail
    assert not waiter.done()
    released_at = time.monotonic()
    await first.release()
    await waiter
    woke_after = time.monotonic() - released_at
    assert second.held
    assert woke_after < 10, woke_after
    assert second.token > first.token
    await second.release()


async def test_timeout_and_try_acquire(bus: SessionBus) -> None:
    holder = TurnLock(bus, "s1")
    await holder.acquire()
    other = TurnLock(bus, "s1")
    assert not await other.try_acquire()
    started = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        await other.acquire(timeout=0.3)
    assert info.value.session_id == "s1"
    assert 0.25 < time.monotonic() - started < 5
    # Other sessions are independent.
    assert await TurnLock(bus, "s2").try_acquire()
    await holder.release()
    assert await other.try_acquire()
    await other.release()


async def test_refresh_keeps_the_lock_past_its_lease(bus: SessionBus) -> None:
    lock = TurnLock(bus, "s1", lease=1.0, refresh=0.25)
    await lock.acquire()
    first_revision = (await read_lock(bus, "s1")).revision  # type: ignore[union-attr]
    with pytest.raises(LockTimeout):
        await TurnLock(bus, "s1").acquire(timeout=2.5)
    state = await read_lock(bus, "s1")
    assert state is not None and state.revision > first_revision
    assert state.token == lock.token  # refreshes keep the fencing token
    assert lock.held
    await lock.release()


async def test_overwritten_lease_is_lost_and_release_raises(bus: SessionBus) -> None:
    lock = TurnLock(bus, "s1", lease=2.0, refresh=0.2)
    await lock.acquire()
    await bus.locks_kv.put(bus.names.lock_key("s1"), b"intruder")
    await asyncio.wait_for(lock.lost.wait(), 5)
    assert not lock.held
    with pytest.raises(LockLost) as info:
        await lock.check()
    assert info.value.session_id == "s1"
    with pytest.raises(LockLost):
        await lock.release()
    # The intruder's key is left alone by the failed holder.
    assert await bus.locks_kv.get(bus.names.lock_key("s1")) is not None


async def test_check_detects_a_stale_holder(bus: SessionBus) -> None:
    lock = TurnLock(bus, "s1", lease=30)
    token = await lock.acquire()
    assert await lock.check() == token
    # Someone removes the lease and another process takes the lock.
    await bus.locks_kv.delete(bus.names.lock_key("s1"))
    newer = TurnLock(bus, "s1")
    assert await newer.try_acquire()
    assert newer.token > token
    with pytest.raises(LockLost):
        await lock.check()
    assert lock.lost.is_set()
    await newer.release()


async def test_misuse_is_a_lock_error(bus: SessionBus) -> None:
    lock = TurnLock(bus, "s1")
    with pytest.raises(LockError):
        await lock.release()
    await lock.acquire()
    with pytest.raises(LockError):
        await lock.acquire()
    with pytest.raises(ConfigError):
        await TurnLock(bus, "s2").acquire(timeout=-1)
    await lock.release()


async def test_context_manager_lets_the_turns_error_through(bus: SessionBus) -> None:
    lock = TurnLock(bus, "s1")
    with pytest.raises(ZeroDivisionError):
        async with lock:
            assert lock.held
            1 / 0  # noqa: B018
    assert not lock.held
    assert await read_lock(bus, "s1") is None


async def test_crashed_holder_frees_the_lock_within_its_lease(bus: SessionBus) -> None:
    lease = 2.0
    env = {**os.environ}
    env.pop("SESSIONBUS_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, bus.url, "crash", str(lease),
        stdout=asyncio.subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"held"), line
        dead_token = int(line.split()[1])
        waiter = TurnLock(bus, "crash")
        assert not await waiter.try_acquire()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed_at = time.monotonic()
        token = await waiter.acquire(timeout=lease + 10)
        freed_after = time.monotonic() - killed_at
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert token > dead_token
    # The last refresh was at most lease/3 before the kill.
    assert freed_after < lease + 2.0, freed_after
    await waiter.release()


async def test_timings_are_checked_settings() -> None:
    assert BusSettings().lock_lease == 10.0
    with pytest.raises(ConfigError):
        BusSettings(lock_lease=0)
    with pytest.raises(ConfigError):
        BusSettings(lock_lease=float("inf"))
    with pytest.raises(ConfigError):
        BusSettings(lock_lease=4, lock_refresh=3)
    with pytest.raises(ConfigError):
        BusSettings(lock_refresh=-1)
    settings = BusSettings.from_url("nats://127.0.0.1:4222?lock_lease=6&lock_refresh=1.5")
    assert (settings.lock_lease, settings.lock_refresh) == (6.0, 1.5)
    sb = SessionBus(settings=settings)
    lock = TurnLock(sb, "s1")
    assert (lock.lease, lock.refresh) == (6.0, 1.5)
    assert TurnLock(sb, "s1", lease=3).refresh == 1.0
    with pytest.raises(ConfigError):
        TurnLock(sb, "s1", lease=1, refresh=0.9)
