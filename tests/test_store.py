"""SessionStore: the AG2 MCP session store on the bus, turn lock across processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sessionbus.bus._lock import TurnLock
from sessionbus.bus._server import NatsServer
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import ConfigError
from sessionbus.bus.store import SessionStore, SessionStream
from sessionbus.schemas import Envelope

BusFactory = Callable[..., Awaitable[SessionBus]]

# One replica: waits for "go" on stdin, then runs TURNS turns on the shared
# session and, in parallel, TURNS turns on a session of its own, logging
# each turn's start and end (wall clock) as JSON lines.
_REPLICA = """
import asyncio, json, sys, time
from sessionbus.bus.core import SessionBus
from sessionbus.bus.store import SessionStore

URL, TAG, LOG, TURNS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

async def turns(store, sid, out):
    for i in range(TURNS):
        async with store.session(sid) as stream:
            start = time.time()
            await stream.send(f"{TAG}:{i}:a")
            await asyncio.sleep(0.05)
            await stream.send(f"{TAG}:{i}:b")
            end = time.time()
        out.write(json.dumps({"sid": sid, "start": start, "end": end}) + "\\n")

async def main():
    async with SessionBus(URL) as sb:
        store = SessionStore(storage=sb)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        with open(LOG, "w") as out:
            await asyncio.gather(turns(store, "s1", out), turns(store, "own-" + TAG, out))

asyncio.run(main())
"""


def _texts(envelopes: list[Envelope]) -> list[str]:
    return [e.content for e in envelopes]


async def _history_count(bus: SessionBus, session_id: str) -> int:
    info = await bus.js.stream_info(
        bus.names.envelope_stream, subjects_filter=bus.names.history_filter(session_id)
    )
    return sum((info.state.subjects or {}).values())


def test_validation_errors_are_the_seeds() -> None:
    with pytest.raises(ValueError, match=r"^max_sessions must be >= 1, got 0\.$"):
        SessionStore(max_sessions=0)
    with pytest.raises(ConfigError, match=r"^ttl must be > 0 when set, got 0\.$"):
        SessionStore(ttl=0)
    with pytest.raises(ConfigError, match=r"^ttl must be > 0 when set, got -1\.5\.$"):
        SessionStore(ttl=-1.5)
    store = SessionStore(max_sessions=3, ttl=2.5)
    assert (store.max_sessions, store.ttl, len(store)) == (3, 2.5, 0)


async def test_acquire_reads_prior_turns_back(bus: SessionBus) -> None:
    store = SessionStore(storage=bus)
    async with store.session("s1") as stream:
        assert isinstance(stream, SessionStream)
        assert stream.token is not None
        await stream.send("hello")
        await stream.send("again")
    first = await store.acquire("s1")
    second = await store.acquire("s1")
    assert first is not second
    assert first.token is None
    assert _texts(await first.history()) == ["hello", "again"]
    meta = await bus.lifecycle.load("s1")
    assert meta is not None and meta.ttl_seconds is None  # the store decides when it goes
    # Another store (another replica) on the same bus sees the same history.
    other = SessionStore(storage=bus)
    async with other.session("s1") as stream:
        assert _texts(await stream.history()) == ["hello", "again"]
    await store.close()
    assert bus.started  # a given bus is not the store's to close


async def test_turns_of_one_session_serialize_in_process(bus: SessionBus) -> None:
    store = SessionStore(storage=bus)
    inside = 0
    peak = 0

    async def turn(i: int) -> None:
        nonlocal inside, peak
        async with store.session("s1") as stream:
            inside += 1
            peak = max(peak, inside)
            await stream.send(f"{i}:a")
            await asyncio.sleep(0.01)
            await stream.send(f"{i}:b")
            inside -= 1

    await asyncio.gather(*(turn(i) for i in range(6)))
    assert peak == 1
    texts = _texts(await (await store.acquire("s1")).history())
    assert len(texts) == 12
    for a, b in zip(texts[::2], texts[1::2], strict=True):
        assert a.split(":")[0] == b.split(":")[0], texts


async def test_turn_lock_serializes_two_processes(
    nats_server: NatsServer, bus: SessionBus, tmp_path: Path
) -> None:
    turns = 6
    env = {k: v for k, v in os.environ.items() if k != "SESSIONBUS_URL"}
    procs = []
    logs = []
    for tag in ("A", "B"):
        log = tmp_path / f"{tag}.jsonl"
        logs.append(log)
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-c", _REPLICA, nats_server.url, tag, str(log), str(turns),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        ))
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).startswith(b"ready")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        for proc in procs:
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    records = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    shared = sorted((r["start"], r["end"]) for r in records if r["sid"] == "s1")
    assert len(shared) == 2 * turns
    for (_, end), (start, _) in itertools.pairwise(shared):
        assert end <= start, shared  # no two turns of s1 overlap
    own_a = [(r["start"], r["end"]) for r in records if r["sid"] == "own-A"]
    own_b = [(r["start"], r["end"]) for r in records if r["sid"] == "own-B"]
    overlapping = [
        (a, b) for a in own_a for b in own_b if a[0] < b[1] and b[0] < a[1]
    ]
    assert overlapping, "different sessions should run at the same time"
    # The shared history holds whole turns: each turn's two envelopes adjacent.
    texts = _texts(await (await SessionStore(storage=bus).acquire("s1")).history())
    assert len(texts) == 4 * turns
    for a, b in zip(texts[::2], texts[1::2], strict=True):
        assert a[:-1] == b[:-1] and a.endswith("a") and b.endswith("b"), texts


async def test_lru_overflow_evicts_and_drops_history(bus: SessionBus) -> None:
    store = SessionStore(max_sessions=2, storage=bus)
    for sid in ("a", "b"):
        async with store.session(sid) as stream:
            await stream.send(f"{sid} says hi")
    assert await _history_count(bus, "a") == 1
    await store.acquire("a")  # a is now the most recent; b the least
    await store.acquire("c")
    assert "b" not in store and "a" in store and "c" in store
    assert await _history_count(bus, "b") == 0
    assert await bus.sessions_kv.get(bus.names.session_key("b")) is None
    assert await _history_count(bus, "a") == 1
    # Coming back, b starts over with an empty history.
    assert await (await store.acquire("b")).history() == []


async def test_idle_ttl_by_clock_evicts(bus: SessionBus) -> None:
    now = [1000.0]
    store = SessionStore(ttl=10, storage=bus, clock=lambda: now[0])
    async with store.session("old") as stream:
        await stream.send("x")
    now[0] += 5
    await store.acquire("fresh")
    assert "old" in store
    now[0] += 6  # old: 11 s idle, fresh: 6 s
    await store.acquire("other")
    assert "old" not in store and "fresh" in store
    assert await _history_count(bus, "old") == 0


async def test_a_session_mid_turn_is_not_evicted(bus: SessionBus) -> None:
    store = SessionStore(max_sessions=1, storage=bus)
    entered = asyncio.Event()
    finish = asyncio.Event()

    async def long_turn() -> None:
        async with store.session("busy") as stream:
            await stream.send("working")
            entered.set()
            await finish.wait()
            await stream.send("done")

    task = asyncio.create_task(long_turn())
    await asyncio.wait_for(entered.wait(), 10)
    await store.acquire("idle")  # over the bound, but "busy" is mid-turn
    assert "busy" in store and len(store) == 2
    finish.set()
    await task
    # The turn over, the next overflow evicts the least recent: "idle".
    assert _texts(await (await store.acquire("busy")).history()) == ["working", "done"]
    assert "idle" not in store and len(store) == 1


async def test_a_session_locked_by_another_process_is_skipped(
    nats_server: NatsServer, bus: SessionBus, bus_factory: BusFactory
) -> None:
    store = SessionStore(max_sessions=2, storage=bus)
    for sid in ("remote", "b"):
        async with store.session(sid) as stream:
            await stream.send(f"{sid} turn")
    # Another replica is mid-turn on "remote", the least recent here.
    other_bus = await bus_factory(nats_server.url)
    foreign = TurnLock(other_bus, "remote")
    await foreign.acquire()
    await store.acquire("c")
    assert "remote" in store and "b" not in store  # skipped for the next candidate
    assert await _history_count(bus, "remote") == 1
    await foreign.release()
    await store.acquire("d")
    assert "remote" not in store
    assert await _history_count(bus, "remote") == 0


async def test_own_bus_started_on_first_use_and_closed(monkeypatch: pytest.MonkeyPatch,
                                                       nats_server: NatsServer) -> None:
    monkeypatch.setenv("SESSIONBUS_URL", nats_server.url)
    async with SessionStore() as store:
        async with store.session("s1") as stream:
            await stream.send("hi")
        bus = await store.start()
        assert bus.started
    assert not bus.started


async def test_a_closed_session_starts_over_with_empty_history(bus: SessionBus) -> None:
    store = SessionStore(storage=bus)
    async with store.session("s1") as stream:
        await stream.send("first life")
    await bus.session("s1").close("done elsewhere")
    async with store.session("s1") as stream:
        assert await stream.history() == []
        meta = await bus.lifecycle.load("s1")
        assert meta is not None and not meta.is_terminal()


async def test_a_reopened_session_accepts_sends(bus: SessionBus) -> None:
    store = SessionStore(storage=bus)
    async with store.session("s1") as stream:
        await stream.send("first life")
    await bus.session("s1").close("done elsewhere")
    async with store.session("s1") as stream:
        await stream.send("second life")
        assert _texts(await stream.history()) == ["second life"]


async def test_a_session_idle_past_ttl_asked_by_its_own_id_starts_empty(
        bus: SessionBus) -> None:
    now = [0.0]
    store = SessionStore(ttl=10, storage=bus, clock=lambda: now[0])
    async with store.session("s1") as stream:
        await stream.send("old turn")
    now[0] = 11.0  # idle longer than ttl; nothing else touched the store meanwhile
    async with store.session("s1") as stream:
        assert await stream.history() == []
    now[0] = 15.0  # used 4 s ago: kept
    assert len(await (await store.acquire("s1")).history()) == 0
    async with store.session("s1") as stream:
        await stream.send("new turn")
    now[0] = 20.0
    assert [e.content for e in await (await store.acquire("s1")).history()] == ["new turn"]


async def test_lru_of_one_replica_keeps_history_another_just_wrote(
        bus_factory: BusFactory, nats_server: NatsServer) -> None:
    a = SessionStore(max_sessions=1, storage=await bus_factory(nats_server.url))
    b = SessionStore(storage=await bus_factory(nats_server.url))
    await a.acquire("s1")
    async with b.session("s1") as stream:  # replica B writes after A's last use
        await stream.send("from b")
    await a.acquire("s2")  # A's LRU overflows on s1: only forgotten by A
    assert "s1" not in a
    assert [e.content for e in await (await b.acquire("s1")).history()] == ["from b"]
    await a.acquire("s3")  # s2 was A's alone and nobody used it since: dropped
    assert await (await b.acquire("s2")).history() == []
