"""Least-privilege subject permissions of each role, generated from :class:`Names`.

A tenant is a NATS account: nothing of one account is reachable from
another, whatever a user of it publishes. Inside a tenant, each user has a
role, and the role's permissions are built here from the same
:class:`~sessionbus.bus._names.Names` every other module uses to name its
subjects, streams and buckets, so they cannot drift apart:

``client``
    Opens sessions, sends into them, reads their history and token
    streams, closes and interrupts them (any session of its prefixes: see
    the README's Security section), publishes and hears open hints. It
    writes the session and registry records through the library, takes
    turn locks, and lists buckets (through ordered consumers, or a
    short-lived consumer of a bucket's stream). It cannot pull or ack the
    workers' consumers, create, change or delete a consumer of the envelope
    stream, write a worker lease, publish a token stream, a dead letter or
    a worker ping, create, change or delete streams, purge history, or
    reach a subject of another prefix.
``worker``
    Everything a client may do (a handler opens, sends and replies), plus:
    create, pull, ack and unpin its group's pinned consumers (every group,
    or one group and its partitions when bound to it), write its group's
    leases, ping and answer its group's members, publish token streams and
    dead letters, drop a session's history, and use the buckets and stream
    of the optional components under their default names (the store,
    manager and framework integrations run on workers). It cannot create or
    delete streams or buckets.
``admin``
    Everything inside the tenant's account: provisioning, repairs, reading
    the dead letters.

Every JetStream API subject is allowed under ``$JS.API`` and, for each
domain given, ``$JS.<domain>.API`` (clients at an edge site reach the hub's
JetStream through its domain).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sessionbus.bus._names import Names, validate_id

__all__ = ["Permissions", "Role", "role_permissions"]

INBOX_PREFIX = "_INBOX"


class Role(enum.StrEnum):
    """What a user of a tenant may do; see the module docstring."""

    CLIENT = "client"
    WORKER = "worker"
    ADMIN = "admin"


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish and subscribe to (nats-server's ``permissions`` block)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: May answer a request it received (once, on its reply subject), whatever
    #: the subject: workers answer their group's liveness pings this way.
    allow_responses: bool = False

    def to_config(self) -> dict[str, Any]:
        """The ``permissions`` block, as a JSON-compatible mapping for a server config."""
        config: dict[str, Any] = {"publish": {"allow": list(self.publish)},
                                  "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            config["allow_responses"] = True
        return config

    def allows_publish(self, subject: str) -> bool:
        """Whether a publish on the literal ``subject`` is allowed (NATS wildcard rules)."""
        return any(_matches(pattern, subject) for pattern in self.publish)

    def allows_subscribe(self, subject: str) -> bool:
        """Whether a subscription on the literal ``subject`` is allowed."""
        return any(_matches(pattern, subject) for pattern in self.subscribe)


def _matches(pattern: str, subject: str) -> bool:
    ptoks, stoks = pattern.split("."), subject.split(".")
    for i, tok in enumerate(ptoks):
        if tok == ">":
            return len(stoks) > i
        if i >= len(stoks) or (tok != "*" and tok != stoks[i]):
            return False
    return len(ptoks) == len(stoks)


def _api_prefixes(domains: Iterable[str]) -> list[str]:
    return ["$JS.API", *(f"$JS.{validate_id(d, 'domain')}.API" for d in domains)]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _kv_write(bucket: str, keys: str, apis: Sequence[str]) -> list[str]:
    """A bucket's write subjects: ``$KV.<bucket>.<keys>`` and its cross-domain forms."""
    return [f"$KV.{bucket}.{keys}",
            *(f"{api}.$KV.{bucket}.{keys}" for api in apis if api != "$JS.API")]


def _client(n: Names, apis: Sequence[str]) -> tuple[list[str], list[str]]:
    streams = [n.envelope_stream, n.dead_letter_stream,
               *(f"KV_{b}" for b in (n.sessions_bucket, n.registry_bucket,
                                     n.workers_bucket, n.locks_bucket))]
    kv_streams = streams[2:]
    pub = [
        n.inbound_all,
        n.closed_all,
        n.opened_all,
        n.interrupt_all,
        *_kv_write(n.sessions_bucket, ">", apis),
        *_kv_write(n.registry_bucket, ">", apis),
        *_kv_write(n.locks_bucket, ">", apis),
    ]
    for api in apis:
        pub.append(f"{api}.INFO")
        for stream in streams:
            pub += [f"{api}.STREAM.INFO.{stream}", f"{api}.DIRECT.GET.{stream}",
                    f"{api}.DIRECT.GET.{stream}.>"]
        pub.append(f"{api}.STREAM.MSG.GET.{n.envelope_stream}")
        # On the envelope stream, ordered consumers only: the subject without
        # a consumer name makes the server refuse a durable one, so a
        # worker's consumer cannot be created, changed or deleted from here.
        for stream in (n.envelope_stream, *kv_streams):
            pub += [f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.INFO.{stream}.*"]
        # Listing a bucket past what one Direct Get returns uses a short-lived
        # named pull consumer; buckets have no consumer of the workers'.
        for stream in kv_streams:
            pub += [f"{api}.CONSUMER.CREATE.{stream}.*", f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
                    f"{api}.CONSUMER.DELETE.{stream}.*"]
    pub += [f"$JS.FC.{stream}.>" for stream in (n.envelope_stream, *kv_streams)]
    sub = [f"{INBOX_PREFIX}.>", n.closed_all, n.opened_all, n.interrupt_all,
           f"{n.prefix}.out.>"]
    return pub, sub


def _worker(n: Names, apis: Sequence[str], group: str | None,
            partitions: int | None) -> tuple[list[str], list[str]]:
    pub, sub = _client(n, apis)
    if group is None:
        consumers = ["*"]
        lease_keys = records = ">"
        dead = f"{n.prefix}.dead.*.*"
        pings = n.worker_ping("x", "y").rsplit(".", 2)[0] + ".*.*"
    else:
        if not partitions:
            raise ValueError("a worker bound to a group needs the partition count")
        consumers = [n.worker_consumer(group, p) for p in range(partitions)]
        lease_keys = n.worker_group_filter(group)
        records = n.completion_filter(group)
        dead = f"{n.prefix}.dead.{n.dead_letter(group, 'x').split('.')[2]}.*"
        pings = n.worker_ping(group, "x").rsplit(".", 1)[0] + ".*"
    # The optional components that run beside workers (the session store, the
    # framework integrations) keep their own buckets and a history stream,
    # under their default names; an admin creates them by starting each once.
    for bucket in (n.store_uses_bucket, n.va_sessions_bucket, n.ag2_sessions_bucket):
        pub += _kv_write(bucket, ">", apis)
        for api in apis:
            pub += [f"{api}.STREAM.INFO.KV_{bucket}", f"{api}.DIRECT.GET.KV_{bucket}",
                    f"{api}.DIRECT.GET.KV_{bucket}.>", f"{api}.CONSUMER.CREATE.KV_{bucket}",
                    f"{api}.CONSUMER.INFO.KV_{bucket}.*",
                    # A listing past what one Direct Get returns (as for a client's buckets).
                    f"{api}.CONSUMER.CREATE.KV_{bucket}.*",
                    f"{api}.CONSUMER.MSG.NEXT.KV_{bucket}.*",
                    f"{api}.CONSUMER.DELETE.KV_{bucket}.*"]
        pub.append(f"$JS.FC.KV_{bucket}.>")
    history = n.ag2_history_stream
    pub += [f"{n.ag2_history_root}.>", f"$JS.FC.{history}.>"]
    for api in apis:
        # A long history is read on by a short-lived consumer, created without
        # a name (bus/_seqread.py), as a client reads a session's.
        pub += [f"{api}.STREAM.INFO.{history}", f"{api}.DIRECT.GET.{history}",
                f"{api}.DIRECT.GET.{history}.>", f"{api}.STREAM.PURGE.{history}",
                f"{api}.CONSUMER.CREATE.{history}"]
    stream = n.envelope_stream
    # Liveness pings between the workers of a group, answered on their own connection.
    pub += [f"{n.prefix}.out.*.*", dead, pings, *_kv_write(n.workers_bucket, lease_keys, apis)]
    if records != lease_keys:  # the group's completion records (workers/_completions.py)
        pub += _kv_write(n.workers_bucket, records, apis)
    sub.append(pings)
    for api in apis:
        pub.append(f"{api}.STREAM.PURGE.{stream}")
        for c in consumers:
            pub += [f"{api}.CONSUMER.CREATE.{stream}.{c}.>",
                    f"{api}.CONSUMER.MSG.NEXT.{stream}.{c}", f"{api}.CONSUMER.UNPIN.{stream}.{c}"]
    pub += [f"$JS.ACK.{stream}.{c}.>" for c in consumers]
    return pub, sub


def role_permissions(
    role: Role | str,
    *,
    prefixes: Sequence[str] = ("sb",),
    domains: Sequence[str] = (),
    group: str | None = None,
    partitions: int | None = None,
) -> Permissions:
    """The permissions of ``role`` on the buses of ``prefixes`` in one tenant.

    ``group`` (workers only) binds a worker to one group: its leases, and the
    pinned consumers of its ``partitions`` partitions, named one by one.
    """
    role = Role(role)
    if role is Role.ADMIN:
        return Permissions(publish=(">",), subscribe=(">",))
    if group is not None and role is not Role.WORKER:
        raise ValueError("only a worker is bound to a group")
    apis = _api_prefixes(domains)
    pub: list[str] = []
    sub: list[str] = []
    for prefix in prefixes:
        names = Names(prefix)
        p, s = (_client(names, apis) if role is Role.CLIENT
                else _worker(names, apis, group, partitions))
        pub += p
        sub += s
    return Permissions(publish=_unique(pub), subscribe=_unique(sub),
                       allow_responses=role is Role.WORKER)
