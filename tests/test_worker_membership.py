"""Worker leases: members, claims, joins, leaves, expiry, and the scheme a group runs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

import pytest
from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsServer
from sessionbus.bus.errors import DecodeError, WorkerError
from sessionbus.schemas import decode_map, encode
from sessionbus.workers._assignment import AssignmentScheme, assign
from sessionbus.workers._membership import Lease, Membership
from worker_proc import FAST

from sessionbus.testing import BusFactory

CONFIG = FAST.replace(lease_ttl=1)


def test_lease_round_trips_and_rejects_garbage() -> None:
    lease = Lease(worker_id="w", node_id="n", claims=frozenset({3, 1}), draining=True,
                  started_at=1.0, expires_at=2.0)
    assert Lease.decode(lease.encode()) == lease
    assert lease.scheme is AssignmentScheme.BALANCED
    with pytest.raises(DecodeError):
        Lease.decode(b"junk")
    # An older version's lease names no scheme: it runs plain rendezvous.
    older = decode_map(lease.encode())
    del older["assignment"]
    assert Lease.decode(encode(older)).scheme is AssignmentScheme.RENDEZVOUS
    # A newer version's scheme runs as the newest known here; 0 or less as the oldest.
    for number, scheme in ((7, AssignmentScheme.BALANCED), (0, AssignmentScheme.RENDEZVOUS),
                           (-3, AssignmentScheme.RENDEZVOUS)):
        assert Lease.decode(encode({**older, "assignment": number})).scheme is scheme
    # Numbers no int can hold are garbage too, not a crash.
    for field, value in (("assignment", float("inf")), ("claims", [float("-inf")])):
        with pytest.raises(DecodeError):
            Lease.decode(encode({**older, field: value}))


@pytest.fixture
async def sb(nats_server: NatsServer, bus_factory: BusFactory) -> SessionBus:
    return await bus_factory(nats_server.url, partitions=8)


@pytest.fixture
async def member(sb: SessionBus) -> AsyncIterator[Callable[[str], Membership]]:
    made: list[Membership] = []

    def make(worker_id: str) -> Membership:
        m = Membership(sb, group="g", worker_id=worker_id, config=CONFIG)
        made.append(m)
        return m

    yield make
    for m in made:
        await m.close()


async def until(cond: Callable[[], bool], within: float = 10.0) -> float:
    """Wait for ``cond`` (polled); return how long it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_members_see_each_other_claims_and_leaves(
    member: Callable[[str], Membership]
) -> None:
    a, b = member("a"), member("b")
    await a.join()
    assert set(a.members()) == {"a"}
    assert a.assigned(8) == set(range(8))
    await b.join()
    assert set(b.members()) == {"a", "b"}  # join loads the group before following it
    await until(lambda: set(a.members()) == {"a", "b"})
    expected = assign(8, ["a", "b"])
    assert a.assigned(8) == expected["a"] and b.assigned(8) == expected["b"]
    await a.update(claims={0, 1, 2})
    await until(lambda: b.claimed_elsewhere() == {0, 1, 2})
    await b.update(draining=True)
    await until(lambda: a.assigned(8) == set(range(8)))
    await a.leave()
    await until(lambda: set(b.members()) == {"b"})


async def test_a_group_balances_only_once_no_member_runs_the_older_scheme(
    member: Callable[[str], Membership]
) -> None:
    a, b, old = member("a"), member("b"), member("old")
    old._lease = dataclasses.replace(old.lease, scheme=AssignmentScheme.RENDEZVOUS)  # older
    for m in (a, b, old):
        await m.join()
    await until(lambda: all(set(m.members()) == {"a", "b", "old"} for m in (a, b, old)))
    plain = assign(8, ["a", "b", "old"], scheme=AssignmentScheme.RENDEZVOUS)
    assert plain != assign(8, ["a", "b", "old"])  # the two schemes differ for this group
    for m in (a, b, old):
        assert m.assigned(8) == plain[m.worker_id]
    await old.leave()
    balanced = assign(8, ["a", "b"])
    assert balanced != assign(8, ["a", "b"], scheme=AssignmentScheme.RENDEZVOUS)
    await until(lambda: a.assigned(8) == balanced["a"] and b.assigned(8) == balanced["b"])


async def test_a_lease_with_an_infinite_number_is_ignored_not_fatal(
    sb: SessionBus, member: Callable[[str], Membership]
) -> None:
    # Written by someone else (or a newer version): joining and watching go on.
    forged = decode_map(Lease(worker_id="forged").encode()) | {"assignment": float("inf")}
    await sb.workers_kv.put(sb.names.worker_key("g", "forged"), encode(forged))
    a, b = member("a"), member("b")
    await a.join()
    await b.join()
    await until(lambda: set(a.members()) == {"a", "b"})
    assert set(b.members()) == {"a", "b"}


async def test_a_member_that_stops_refreshing_expires(
    member: Callable[[str], Membership]
) -> None:
    a, b = member("a"), member("b")
    await a.join()
    await b.join()
    await until(lambda: "b" in a.members())
    await b.update(claims={5})
    await until(lambda: a.claimed_elsewhere() == {5})
    await b.close()  # as if the process died: no delete, the TTL runs out
    took = await until(lambda: "b" not in a.members(), within=CONFIG.lease_ttl + 5)
    print(f"\nlease of a silent member gone after {took:.2f}s (lease_ttl {CONFIG.lease_ttl}s)")
    assert a.claimed_elsewhere() == set()


async def test_one_live_lease_per_worker_id(member: Callable[[str], Membership]) -> None:
    await member("same").join()
    with pytest.raises(WorkerError):
        await member("same").join()


async def test_a_lost_lease_is_noticed_and_can_be_rejoined(
    sb: SessionBus, member: Callable[[str], Membership]
) -> None:
    a = member("a")
    await a.join()
    await a.update(claims={1})
    await sb.workers_kv.delete(sb.names.worker_key("g", "a"))  # e.g. expired during a stall
    await asyncio.wait_for(a.lost.wait(), CONFIG.refresh_interval + 5)
    assert "a" not in a.members()
    await a.rejoin()
    assert not a.lost.is_set()
    assert a.lease.claims == frozenset()
    entry = await sb.workers_kv.get(sb.names.worker_key("g", "a"))
    assert entry is not None and Lease.decode(entry.value).worker_id == "a"
