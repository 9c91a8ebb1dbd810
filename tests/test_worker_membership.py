"""Worker leases and partition assignment: who pulls which partition, joins, leaves, expiry."""

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
from sessionbus.workers._membership import BALANCED, RENDEZVOUS, Lease, Membership, assign
from worker_proc import FAST

from sessionbus.testing import BusFactory

CONFIG = FAST.replace(lease_ttl=1)


@pytest.mark.parametrize("scheme", [BALANCED, RENDEZVOUS])
def test_assign_gives_every_partition_one_owner(scheme: int) -> None:
    members = [f"w{i}" for i in range(5)]
    shares = assign(256, members, scheme=scheme)
    owned = [p for ps in shares.values() for p in ps]
    assert sorted(owned) == list(range(256))
    assert all(20 <= len(ps) <= 80 for ps in shares.values()), shares
    # The order of the view does not matter.
    assert assign(256, reversed(members), scheme=scheme) == shares
    assert assign(8, [], scheme=scheme) == {}


def _moved(before: dict[str, set[int]], after: dict[str, set[int]]) -> int:
    owner = {p: m for m, ps in before.items() for p in ps}
    return sum(owner[p] != m for m, ps in after.items() for p in ps)


@pytest.mark.parametrize("partitions", [8, 64, 256])
def test_balanced_shares_differ_by_at_most_one_and_a_join_moves_little(partitions: int) -> None:
    worst_plain = 0.0
    for count in range(1, 21):
        members = [f"worker-{i}" for i in range(count)]
        shares = assign(partitions, members)
        sizes = sorted(len(ps) for ps in shares.values())
        assert sizes[0] == partitions // count and sizes[-1] == -(-partitions // count), sizes
        assert sorted(p for ps in shares.values() for p in ps) == list(range(partitions))
        plain = assign(partitions, members, scheme=RENDEZVOUS)
        worst_plain = max(worst_plain, max(len(ps) for ps in plain.values()) * count / partitions)
        # A join or a leave moves at most 3x the share that changes hands.
        joined = assign(partitions, [*members, "newcomer"])
        assert _moved(shares, joined) <= 3 * len(joined["newcomer"]) + 1
        if count > 1:
            left = assign(partitions, members[1:])
            assert _moved({m: ps for m, ps in shares.items() if m != "worker-0"},
                          {m: ps - shares["worker-0"] for m, ps in left.items()}) \
                <= 2 * len(shares["worker-0"]) + 1
    if partitions == 64:
        assert worst_plain > 1.5  # what balancing is for: rendezvous alone is this uneven


def test_a_join_or_a_leave_moves_only_that_members_partitions_under_rendezvous() -> None:
    def assign_plain(partitions: int, members: list[str]) -> dict[str, set[int]]:
        return assign(partitions, members, scheme=RENDEZVOUS)

    before = assign_plain(128, ["a", "b", "c"])
    after = assign_plain(128, ["a", "b", "c", "d"])
    for member in ("a", "b", "c"):
        assert after[member] <= before[member]  # nobody gains but the newcomer
    assert after["d"] == set().union(*(before[m] - after[m] for m in ("a", "b", "c")))
    left = assign_plain(128, ["a", "c"])
    assert left["a"] >= before["a"] and left["c"] >= before["c"]
    assert left["a"] | left["c"] == set(range(128))


def test_lease_round_trips_and_rejects_garbage() -> None:
    lease = Lease(worker_id="w", node_id="n", claims=frozenset({3, 1}), draining=True,
                  started_at=1.0, expires_at=2.0)
    assert Lease.decode(lease.encode()) == lease
    assert lease.assignment == BALANCED
    with pytest.raises(DecodeError):
        Lease.decode(b"junk")
    # An older version's lease names no scheme: it runs plain rendezvous.
    older = decode_map(lease.encode())
    del older["assignment"]
    assert Lease.decode(encode(older)).assignment == RENDEZVOUS
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
    old._lease = dataclasses.replace(old.lease, assignment=RENDEZVOUS)  # an older version
    for m in (a, b, old):
        await m.join()
    await until(lambda: all(set(m.members()) == {"a", "b", "old"} for m in (a, b, old)))
    plain = assign(8, ["a", "b", "old"], scheme=RENDEZVOUS)
    assert plain != assign(8, ["a", "b", "old"])  # the two schemes differ for this group
    for m in (a, b, old):
        assert m.assigned(8) == plain[m.worker_id]
    await old.leave()
    balanced = assign(8, ["a", "b"])
    assert balanced != assign(8, ["a", "b"], scheme=RENDEZVOUS)
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
