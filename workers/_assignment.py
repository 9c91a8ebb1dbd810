"""Who pulls which partition: a pure function of the set of live members.

Every worker of a group computes the assignment from the same view of the
group, so all of them agree without talking. Two schemes exist:

* :attr:`AssignmentScheme.RENDEZVOUS`, plain rendezvous hashing (the only
  one of older versions): partition ``p`` goes to the member with the
  highest ``score(member, p)``. A join or a leave moves exactly that
  member's share, but shares are even only on average: with 64 partitions
  the busiest of 8 members holds 1.55x the mean share, 2x with 16.
* :attr:`AssignmentScheme.BALANCED`: (member, partition) pairs are handed
  out by descending score, each partition once, each member up to
  ``partitions // members`` or one more. A member keeps its best-scoring
  partitions as the group changes, so a join moves up to about twice the
  newcomer's share on average (3x at worst, 64 partitions, 2-16 members).

A group runs the oldest scheme any of its members announces
(:func:`group_scheme`), so older and newer workers agree during a rolling
upgrade.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable

__all__ = ["AssignmentScheme", "assign", "group_scheme", "score", "share_while_held_back"]


class AssignmentScheme(enum.IntEnum):
    """How a group splits its partitions; leases carry it as an integer."""

    RENDEZVOUS = 1
    """Each partition to its highest-scoring member (shares even on average)."""
    BALANCED = 2
    """Shares differ by at most one partition, chosen by rendezvous scores."""

    @classmethod
    def from_wire(cls, value: int) -> AssignmentScheme:
        """The scheme a lease's number stands for: newer ones run as the newest known here."""
        return cls(min(max(value, cls.RENDEZVOUS), cls.BALANCED))


def score(worker_id: str, partition: int) -> int:
    """Rendezvous weight of ``worker_id`` for ``partition`` (64-bit, stable across hosts)."""
    digest = hashlib.blake2b(f"{worker_id}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _owner_of(partition: int, members: list[str]) -> str | None:
    best: str | None = None
    best_score = -1
    for member in members:
        s = score(member, partition)
        if s > best_score or (s == best_score and best is not None and member > best):
            best, best_score = member, s
    return best


def group_scheme(announced: Iterable[AssignmentScheme]) -> AssignmentScheme:
    """The scheme a group runs: the oldest any of its members announces."""
    return min(announced, default=AssignmentScheme.BALANCED)


def assign(
    partitions: int, members: Iterable[str], *,
    scheme: AssignmentScheme = AssignmentScheme.BALANCED,
) -> dict[str, set[int]]:
    """Every member's partitions out of ``range(partitions)``, under ``scheme``.

    The result depends only on the set of members, so every worker
    computes the same one.
    """
    listed = sorted(set(members))
    out: dict[str, set[int]] = {m: set() for m in listed}
    if not listed:
        return out
    if scheme is AssignmentScheme.RENDEZVOUS:
        for p in range(partitions):
            owner = _owner_of(p, listed)
            if owner is not None:
                out[owner].add(p)
        return out
    room, extra = divmod(partitions, len(listed))
    pairs = sorted(((score(m, p), m, p) for m in listed for p in range(partitions)),
                   reverse=True)
    owned: set[int] = set()
    for _, member, p in pairs:
        if p in owned:
            continue
        share = out[member]
        if len(share) == room and extra:
            extra -= 1  # one of the ``partitions % members`` shares one larger
        elif len(share) >= room:
            continue
        share.add(p)
        owned.add(p)
        if len(owned) == partitions:
            break
    return out


def share_while_held_back(
    partitions: int, member: str, live: Iterable[str], held_back: Iterable[str], *,
    scheme: AssignmentScheme = AssignmentScheme.BALANCED,
) -> set[int]:
    """``member``'s share while some vanished members may still come back.

    Only what is ``member``'s both without them and with them: whether they
    return or not, nothing taken now moves again. (Under plain rendezvous
    this is the share with them: adding members never gives another more.)
    """
    live = set(live)
    share = assign(partitions, live, scheme=scheme).get(member, set())
    extra = set(held_back) - live
    if extra:
        share &= assign(partitions, live | extra, scheme=scheme).get(member, set())
    return share
