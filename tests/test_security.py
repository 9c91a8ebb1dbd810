"""Authentication, tenants and roles against a real nats-server with generated accounts.

Two tenants (NATS accounts) ``acme`` and ``beta``, each with an admin, a
client and a worker whose permissions come from ``bus/_permissions.py``.
Every refusal is the server's: a raw nats-py client is told "permissions
violation" on its error callback before the PONG of the flush that follows
the attempt, so each check is deterministic without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from jwt_creds import Operator
from nats.aio.client import Client
from sessionbus.bus import (
    AuthenticationFailed,
    PermissionDenied,
    SessionBus,
    SessionStore,
    _seqread,
)
from sessionbus.bus._names import Names
from sessionbus.bus._permissions import Role, role_permissions
from sessionbus.bus._server import NatsServer
from sessionbus.bus._subscriptions import server_holds_subscriptions
from sessionbus.bus.manager import SessionManager
from sessionbus.bus.settings import BusSettings
from sessionbus.schemas import SessionState
from sessionbus.workers import DeadLetter, Turn, Worker
from worker_proc import FAST

from sessionbus._auth import AuthDir, new_user_seed
from sessionbus.integrations._bus import ensure_bucket
from sessionbus.integrations._jshistory import JetStreamHistory
from sessionbus.integrations.vision_agents import NatsSessionKVStore
from sessionbus.testing import BusFactory

PARTS = 4
N = Names("sb")


@dataclass
class Secured:
    server: NatsServer
    auth: AuthDir

    def seed(self, tenant: str, user: str) -> str:
        return str(self.auth.seed_file(tenant, user))


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    auth = AuthDir.init(tmp_path / "auth")
    for tenant in ("acme", "beta"):
        auth.add_tenant(tenant)
        auth.add_user(tenant, "admin", Role.ADMIN)
        auth.add_user(tenant, "client", Role.CLIENT)
        auth.add_user(tenant, "worker", Role.WORKER)
    auth.add_user("acme", "bound", Role.WORKER, group="g", partitions=PARTS)
    auth.add_tenant("gamma")  # never provisioned by an admin
    auth.add_user("gamma", "worker", Role.WORKER)
    server = NatsServer(name="secured", accounts_config=auth.accounts_config())
    server.start()
    try:
        yield Secured(server, auth)
    finally:
        server.stop()


@pytest.fixture
async def provisioned(secured: Secured, bus_factory: BusFactory) -> Secured:
    """Both tenants' streams and buckets, created by their admins."""
    for tenant in ("acme", "beta"):
        admin = await bus_factory(secured.server.url, partitions=PARTS,
                                  nkey_seed_file=secured.seed(tenant, "admin"))
        await admin.close()
    return secured


class Raw:
    """A raw nats-py connection that collects the server's refusals."""

    def __init__(self) -> None:
        self.nc = Client()
        self.errors: list[str] = []
        self.sentinels = 0

    async def on_error(self, e: Exception) -> None:
        self.errors.append(str(e).lower())

    async def connect(self, url: str, seed: str) -> Raw:
        await self.nc.connect(url, nkeys_seed=seed, error_cb=self.on_error,
                              allow_reconnect=False)
        return self

    async def _refused(self, attempt: Any, subject: str) -> bool:
        """Run ``attempt``, then publish a sentinel no role may publish, and wait for its
        refusal: the server reports violations in order, so ``subject``'s refusal, if
        any, has arrived by then."""
        self.sentinels += 1
        sentinel = f"never-allowed.{self.sentinels}"
        before = len(self.errors)
        await attempt
        await self.nc.publish(sentinel, b"")
        await self.nc.flush()
        deadline = time.monotonic() + 5
        while not any(sentinel in e for e in self.errors[before:]):
            assert time.monotonic() < deadline, "the sentinel was not refused"
            await asyncio.sleep(0.005)
        return any(f'"{subject.lower()}"' in e for e in self.errors[before:])

    async def denied(self, subject: str, payload: bytes = b"{}") -> bool:
        """Whether the server refuses a publish on ``subject``."""
        return await self._refused(
            self.nc.publish(subject, payload, reply=self.nc.new_inbox()), subject)

    async def sub_denied(self, subject: str) -> bool:
        """Whether the server refuses a subscription to ``subject``."""
        return await self._refused(self.nc.subscribe(subject), subject)


@pytest.fixture
async def raw(provisioned: Secured) -> AsyncIterator[Any]:
    conns: list[Raw] = []

    async def make(tenant: str, user: str) -> Raw:
        conn = await Raw().connect(provisioned.server.url, provisioned.seed(tenant, user))
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        await conn.nc.close()


async def test_connections_without_valid_credentials_are_refused_at_once(
    secured: Secured, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_user_seed())
    for options in ({}, {"nkey_seed_file": str(stranger)}, {"user": "acme", "password": "x"},
                    {"token": "guess"}):
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed) as caught:
            await SessionBus(secured.server.url, **options).start()
        assert time.monotonic() - started < 4.0, options
        message = str(caught.value)
        assert "\n" not in message and "Authorization Violation" in message
        assert "guess" not in message and "password" not in message.lower()


async def test_a_tenant_reaches_nothing_of_another(
    provisioned: Secured, bus_factory: BusFactory, raw: Any
) -> None:
    url = provisioned.server.url
    acme = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "client"))
    beta = await bus_factory(url, nkey_seed_file=provisioned.seed("beta", "client"))
    spy = await raw("beta", "admin")  # everything beta's account allows
    overheard: list[str] = []
    sentinel_heard, mark_heard = asyncio.Event(), asyncio.Event()

    async def hear(msg: Any) -> None:
        overheard.append(msg.subject)
        if msg.subject == "sentinel":
            sentinel_heard.set()
        elif msg.subject == "mark":
            mark_heard.set()

    await spy.nc.subscribe(">", cb=hear)
    await server_holds_subscriptions(spy.nc, 5)

    session = await acme.open("shared-id", participant="alice")
    await session.send("acme's secret")

    assert "shared-id" not in [m.session_id for m in await beta.list_sessions()]
    assert [e async for e in beta.session("shared-id").history()] == []
    # Sending into and closing "shared-id" from beta acts on beta's own
    # namespace: acme's session is untouched.
    other = await beta.open("shared-id", participant="mallory")
    await other.send("from beta")
    await other.close("beta closes its own")
    await spy.nc.publish(N.closed("shared-id"), b"forged")
    record = await acme.lifecycle.load("shared-id")
    assert record is not None and record.state is SessionState.ACTIVE
    texts = [e.content for e in [e async for e in session.history()]]
    assert texts == ["acme's secret"]
    # Nothing acme does reaches beta's account: after acme's traffic, beta's
    # spy hears only its own sentinel, besides beta's bus talking to its
    # own JetStream (API requests and the server's advisories on them, and
    # replies and consumer heartbeats to its inboxes, e.g. re-reading the
    # record after the forged close), which a busy machine may delay.
    # Beta's own hints and the forged close are heard before the mark.
    await server_holds_subscriptions(beta.nc, 5)
    await spy.nc.publish("mark", b"")
    await asyncio.wait_for(mark_heard.wait(), 5)
    mark = overheard.index("mark") + 1
    await acme.session("shared-id").send("still open")
    await (await acme.open("another", participant="alice")).close()
    await spy.nc.publish("sentinel", b"")
    await asyncio.wait_for(sentinel_heard.wait(), 5)
    own = ("_INBOX.", "$JS.API.", "$JS.FC.", "$JS.EVENT.ADVISORY.")
    assert [s for s in overheard[mark:] if not s.startswith(own)] == ["sentinel"]


async def test_a_client_cannot_touch_the_control_plane_it_is_not_entitled_to(
    raw: Any,
) -> None:
    client = await raw("acme", "client")
    consumer = N.worker_consumer("g", 0)
    stream = N.envelope_stream
    forbidden = [
        f"$KV.{N.workers_bucket}.{N.worker_key('g', 'forged')}",  # a worker lease
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",          # pull a worker's partition
        f"$JS.ACK.{stream}.{consumer}.1.1.1.0.0",                  # ack a worker's message
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.sb.p.0.*",   # create/change it
        f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.UNPIN.{stream}.{consumer}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.DELETE.{stream}",
        f"$JS.API.STREAM.PURGE.{stream}",
        f"$JS.API.STREAM.UPDATE.KV_{N.sessions_bucket}",
        N.output("s1", "agent"),                                   # forge a token stream
        N.dead_letter("g", "s1"),
        "other.ctl.s1.closed",                                     # another prefix
        "other.in.s1",
    ]
    for subject in forbidden:
        assert await client.denied(subject), subject
    assert await client.sub_denied(N.inbound_all)
    # The ephemeral-only create subject refuses a durable (a worker's) name.
    reply = await client.nc.request(
        f"$JS.API.CONSUMER.CREATE.{stream}",
        json.dumps({"stream_name": stream, "config": {
            "durable_name": consumer, "ack_policy": "explicit",
            "filter_subject": "sb.p.0.*"}}).encode(), timeout=2)
    assert "error" in json.loads(reply.data)
    reply = await client.nc.request(
        f"$JS.API.CONSUMER.CREATE.{stream}",
        json.dumps({"stream_name": stream, "config": {
            "name": consumer, "ack_policy": "explicit", "filter_subject": "sb.p.0.*"}}).encode(),
        timeout=2)
    assert "error" in json.loads(reply.data) or not json.loads(reply.data)["config"].get(
        "durable_name")
    # A bucket listing past one Direct Get (1,024 keys) reads through a named
    # consumer of the bucket's stream: allowed there, never on the envelopes.
    assert not await client.denied(f"$JS.API.CONSUMER.CREATE.KV_{N.registry_bucket}.scan_1")
    assert await client.denied(f"$JS.API.CONSUMER.CREATE.{stream}.scan_1")
    # What a client does through the library is allowed.
    for subject in (N.inbound("s1"), N.closed("s1"), N.interrupt("s1"),
                    f"$KV.{N.sessions_bucket}.{N.session_key('s1')}"):
        assert not await client.denied(subject), subject


async def test_a_worker_runs_turns_and_cannot_provision(
    provisioned: Secured, bus_factory: BusFactory, raw: Any
) -> None:
    url = provisioned.server.url
    wbus = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "worker"))
    cbus = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "client"))
    seen: list[str] = []

    async def handle(turn: Turn) -> None:
        if turn.envelope.sender_id == "alice":
            seen.append(turn.envelope.content)
            await turn.stream("tok")
            await turn.reply(f"echo {turn.envelope.content}")

    worker = Worker(wbus, group="g", handler=handle, config=FAST)
    await worker.start()
    try:
        session = await cbus.open(participant="alice")
        await session.send("hello")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            history = [e.content async for e in session.history()]
            if "echo hello" in history:
                break
            await asyncio.sleep(0.05)
        assert history == ["hello", "echo hello"]
        await session.close()
    finally:
        await worker.stop()

    w = await raw("acme", "worker")
    for subject in (f"$JS.API.STREAM.CREATE.{N.envelope_stream}",
                    f"$JS.API.STREAM.DELETE.{N.envelope_stream}",
                    f"$JS.API.STREAM.CREATE.KV_{N.workers_bucket}",
                    f"$JS.API.STREAM.UPDATE.{N.envelope_stream}",
                    f"$JS.API.CONSUMER.DELETE.{N.envelope_stream}.{N.worker_consumer('g', 0)}",
                    "other.in.s1"):
        assert await w.denied(subject), subject
    # A worker of a tenant no admin has provisioned: a typed refusal, at once.
    started = time.monotonic()
    with pytest.raises(PermissionDenied) as caught:
        await SessionBus(url, nkey_seed_file=provisioned.seed("gamma", "worker")).start()
    assert time.monotonic() - started < 3.0
    assert caught.value.subject == f"$js.api.stream.create.{N.envelope_stream}"
    # And one of another prefix than its permissions name.
    with pytest.raises(PermissionDenied):
        await SessionBus(url, prefix="fresh",
                         nkey_seed_file=provisioned.seed("acme", "worker")).start()


def test_a_worker_bound_to_a_group_may_only_take_that_groups_partitions() -> None:
    perms = role_permissions(Role.WORKER, group="echo", partitions=PARTS)
    stream = N.envelope_stream
    for p in range(PARTS):
        assert perms.allows_publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{N.worker_consumer('echo', p)}")
    assert not perms.allows_publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{N.worker_consumer('other', 0)}")
    assert perms.allows_publish(f"$KV.{N.workers_bucket}.{N.worker_key('echo', 'w1')}")
    assert not perms.allows_publish(f"$KV.{N.workers_bucket}.{N.worker_key('other', 'w1')}")
    assert perms.allows_publish(f"$KV.{N.workers_bucket}.{N.completion_key('echo', 's')}")
    assert not perms.allows_publish(f"$KV.{N.workers_bucket}.{N.completion_key('other', 's')}")
    assert perms.allows_publish(N.dead_letter("echo", "s"))
    assert not perms.allows_publish(N.dead_letter("other", "s"))
    client = role_permissions(Role.CLIENT, domains=["hub"])
    assert client.allows_publish(f"$JS.hub.API.STREAM.INFO.{stream}")
    assert client.allows_publish(f"$JS.hub.API.$KV.{N.sessions_bucket}.s.x")
    assert not client.allows_publish(f"$JS.hub.API.$KV.{N.workers_bucket}.g.x")
    assert not client.allows_publish(f"$KV.{N.workers_bucket}.{N.completion_key('echo', 's')}")


async def test_rotating_a_user_refuses_its_old_seed(secured: Secured, tmp_path: Path) -> None:
    old = tmp_path / "old.nk"
    await asyncio.to_thread(shutil.copyfile, secured.seed("acme", "client"), old)
    secured.auth.rotate_user("acme", "client")
    secured.server.stop()
    secured.server.accounts_config = secured.auth.accounts_config()
    secured.server.start()
    with pytest.raises(AuthenticationFailed):
        await SessionBus(secured.server.url, nkey_seed_file=str(old)).start()
    nc = await nats.connect(secured.server.url, nkeys_seed=secured.seed("acme", "client"))
    await nc.close()


#: Every core-NATS subject Names builds: (a sample, may a client publish it, may a
#: worker). Keys, filters, streams and buckets are covered through the KV and
#: JetStream API subjects above; this table is about the bus's own subjects.
SUBJECTS = {
    "inbound": (N.inbound("s"), True, True),
    "closed": (N.closed("s"), True, True),
    "opened": (N.opened("s"), True, True),
    "interrupt": (N.interrupt("s"), True, True),
    "output": (N.output("s", "agent"), False, True),
    "dead_letter": (N.dead_letter("g", "s"), False, True),
    "worker_ping": (N.worker_ping("g", "w"), False, True),
    "stored": (N.stored("s", PARTS), False, False),  # only the stream's transform writes it
}
#: Names that are not a subject anyone publishes on (keys, filters, names, helpers).
NOT_SUBJECTS = {
    "agent_output_all", "closed_all", "dead_letter_all", "dead_letter_stream",
    "envelope_stream", "history_filter", "inbound_all", "interrupt_all", "lock_key",
    "locks_bucket", "opened_all", "partition_filter", "partition_of", "partition_of_token",
    "partition_transform", "prefix", "registry_bucket", "registry_call_filter",
    "registry_close_filter", "registry_close_key", "registry_ids_of_key", "registry_key",
    "registry_record_filter", "session_key", "session_of_key", "session_of_subject",
    "session_record_filter", "session_timer_filter", "session_timer_key", "sessions_bucket",
    "worker_consumer", "worker_group_filter", "worker_key", "worker_priority_group",
    "workers_bucket", "store_uses_bucket", "va_sessions_bucket", "ag2_sessions_bucket",
    "ag2_history_stream", "ag2_history_root", "completion_key", "completion_filter",
}


def test_every_subject_the_bus_names_has_a_permission_decision() -> None:
    # A new name in bus/_names.py fails here until bus/_permissions.py decides
    # who may use it (and this table says so).
    public = {n for n in dir(Names) if not n.startswith("_")}
    assert public == set(SUBJECTS) | NOT_SUBJECTS
    client, worker = role_permissions(Role.CLIENT), role_permissions(Role.WORKER)
    for name, (subject, by_client, by_worker) in SUBJECTS.items():
        assert client.allows_publish(subject) is by_client, name
        assert worker.allows_publish(subject) is by_worker, name
    for subject in (N.closed_all, N.opened_all, N.interrupt_all, N.agent_output_all("a")):
        assert client.allows_subscribe(subject) and worker.allows_subscribe(subject), subject
    assert worker.allows_subscribe(N.worker_ping("g", "w"))
    assert not client.allows_subscribe(N.worker_ping("g", "w"))
    assert not client.allows_subscribe(N.inbound_all)


async def test_a_client_lists_a_bucket_of_more_keys_than_one_direct_get_returns(
    provisioned: Secured, bus_factory: BusFactory,
) -> None:
    url = provisioned.server.url
    admin = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "admin"))
    acks = [await admin.js.publish_async(f"$KV.{N.registry_bucket}.call.s{i}", b"x")
            for i in range(1100)]
    await asyncio.gather(*acks)
    client = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "client"))
    entries = await client.registry_kv.list("call.*")
    assert len(entries) == 1100


async def test_creds_files_of_an_operator_setup_connect_with_role_permissions(
    tmp_path: Path, nats_server_factory: Any, bus_factory: BusFactory, raw: Any,
) -> None:
    operator = Operator.new()
    server = nats_server_factory(name="operator", extra_config=operator.server_config())
    files = {}
    for role in Role:
        files[role] = tmp_path / f"{role.value}.creds"
        files[role].write_text(operator.creds(role.value, role_permissions(role)))
    admin = await bus_factory(server.url, partitions=PARTS, creds_file=str(files[Role.ADMIN]))
    await admin.close()
    client = await bus_factory(server.url, creds_file=str(files[Role.CLIENT]))
    session = await client.open(participant="alice")
    await session.send("over a .creds user")
    assert [e.content async for e in session.history()] == ["over a .creds user"]
    with pytest.raises(AuthenticationFailed):
        await SessionBus(server.url).start()
    conn = Raw()
    conn.nc = Client()
    await conn.nc.connect(server.url, user_credentials=str(files[Role.CLIENT]),
                          error_cb=conn.on_error, allow_reconnect=False)
    try:
        assert await conn.denied(f"$KV.{N.workers_bucket}.{N.worker_key('g', 'forged')}")
        assert not await conn.denied(N.inbound("s1"))
    finally:
        await conn.nc.close()


async def test_clients_bound_to_different_prefixes_cannot_close_each_others_sessions(
    tmp_path: Path, nats_server_factory: Any, bus_factory: BusFactory,
) -> None:
    auth = AuthDir.init(tmp_path / "auth", prefixes=("team_a", "team_b"))
    auth.add_tenant("acme")
    auth.add_user("acme", "admin", Role.ADMIN)
    a = auth.add_user("acme", "a", Role.CLIENT, prefixes=("team_a",))
    b = auth.add_user("acme", "b", Role.CLIENT, prefixes=("team_b",))
    server = nats_server_factory(name="prefixes", accounts_config=auth.accounts_config())
    for prefix in ("team_a", "team_b"):
        await (await bus_factory(server.url, prefix=prefix, partitions=PARTS,
                                 nkey_seed_file=str(auth.seed_file("acme", "admin")))).close()
    bus_a = await bus_factory(server.url, prefix="team_a", nkey_seed_file=str(a))
    session = await bus_a.open("s1")
    await bus_factory(server.url, prefix="team_b", nkey_seed_file=str(b))
    with pytest.raises(PermissionDenied):
        await SessionBus(server.url, prefix="team_a", nkey_seed_file=str(b)).start()
    conn = await Raw().connect(server.url, str(b))
    try:
        assert await conn.denied(Names("team_a").closed("s1"))
        assert await conn.denied(f"$KV.{Names('team_a').sessions_bucket}.s.s1")
        assert not await conn.denied(Names("team_b").closed("s1"))
    finally:
        await conn.nc.close()
    assert (await session.info()).state is SessionState.ACTIVE


async def test_a_worker_group_runs_with_no_refusal_from_the_server(
    provisioned: Secured, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    # Everything the runtime does (pins, pulls, acks, in-progress, leases,
    # liveness pings, dead letters, token streams, replies, expiry, a
    # handback on stop) stays inside the worker role's generated permissions.
    secured = provisioned
    url = secured.server.url
    buses = [await bus_factory(url, nkey_seed_file=secured.seed("acme", name))
             for name in ("bound", "worker")]
    client = await bus_factory(url, nkey_seed_file=secured.seed("acme", "client"))
    ran: list[str] = []

    async def handle(turn: Turn) -> Any:
        if turn.envelope.sender_id != "u":
            return None
        ran.append(turn.envelope.content)
        if turn.envelope.content == "dead":
            return DeadLetter("refused")
        await turn.stream("tok")
        await turn.reply(f"r:{turn.envelope.content}")
        return None

    workers = [Worker(b, group="g", handler=handle, config=FAST) for b in buses]
    for w in workers:
        await w.start()
    try:
        session = await client.open(participant="u", ttl=30)
        for text in ("a", "dead", "b"):
            await session.send(text)
        await _until(lambda: len(ran) == 3)
        await workers[0].stop()
        await session.send("after a handback")
        await _until(lambda: len(ran) == 4)
        await session.close()
    finally:
        for w in workers:
            await w.stop()
    assert ran == ["a", "dead", "b", "after a handback"]
    refusals = [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()]
    assert refusals == []


async def _until(cond: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_session_store_runs_as_a_worker_once_an_admin_created_its_bucket(
    provisioned: Secured, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    url = provisioned.server.url
    admin = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "admin"))
    async with SessionStore(storage=admin) as store:  # creates the bucket
        async with store.session("prepared") as stream:
            await stream.send("by the admin")
    worker = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "worker"))
    async with SessionStore(storage=worker) as store:
        async with store.session("s1") as stream:
            await stream.send("by a worker")
            assert [e.content for e in await stream.history()] == ["by a worker"]
        assert await store.evict("s1")
    assert [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()] == []
    client = role_permissions(Role.CLIENT)
    assert not client.allows_publish(f"$KV.{N.store_uses_bucket}.s1")
    assert not client.allows_publish(f"{N.ag2_history_root}.x")


async def test_a_worker_lists_an_integration_bucket_of_more_keys_than_one_direct_get_returns(
    provisioned: Secured, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    url = provisioned.server.url
    admin = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "admin"))
    worker = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "worker"))
    for name in (N.va_sessions_bucket, N.store_uses_bucket, N.ag2_sessions_bucket):
        await ensure_bucket(admin, name)
        acks = [await admin.js.publish_async(f"$KV.{name}.s{i}", b"x") for i in range(1100)]
        await asyncio.gather(*acks)
        start = time.monotonic()
        entries = await (await ensure_bucket(worker, name)).list(">")
        assert len(entries) == 1100, name
        assert time.monotonic() - start < 2.0, name
    assert [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()] == []


async def test_the_vision_agents_store_runs_as_a_worker_with_no_refusal(
    provisioned: Secured, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """Every operation of the store, in the worker role, once an admin created its bucket."""
    url = provisioned.server.url
    admin = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "admin"))
    async with NatsSessionKVStore(bus=admin) as store:
        await store.set("prepared", b"by the admin", 60)
    worker = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "worker"))
    async with NatsSessionKVStore(bus=worker) as store:
        await store.set("call/1/a", b"a", 60)
        await store.set("call/1/a", b"a2", 60, only_if_exists=True)
        await store.set("call/1/absent", b"x", 60, only_if_exists=True)
        many = [(f"call/2/s{i}", b"v", 60.0) for i in range(1100)]
        await store.mset(many)
        await store.expire("call/1/a", "call/2/s0", ttl=120)
        assert await store.get("call/1/a") == b"a2"
        assert await store.get("call/1/absent") is None
        values = await store.mget([key for key, _, _ in many])
        assert values == [b"v"] * len(many)
        assert len(await store.keys("call/2/")) == len(many)  # past one Direct Get
        await store.delete(["call/1/a", "call/2/s0"])
        assert await store.mget(["call/1/a", "call/2/s0", "prepared"]) == [
            None, None, b"by the admin"]
    assert [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()] == []


async def test_a_request_the_role_does_not_allow_fails_at_once(
    provisioned: Secured, bus_factory: BusFactory,
) -> None:
    """PermissionDenied, naming the subject, where the request would wait out its timeout."""
    url = provisioned.server.url
    client = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "client"))
    timeout = client.settings.request_timeout
    session = await client.open(participant="u")
    start = time.monotonic()
    with pytest.raises(PermissionDenied) as refused:
        await client.workers_kv.put("leases.forged", b"x")  # the bus's own inbox
    assert refused.value.subject == f"$KV.{N.workers_bucket}.leases.forged"
    with pytest.raises(PermissionDenied) as refused:
        # A JetStream API request (a purge, which only workers may do).
        await SessionManager(client).start_new_session(session.session_id)
    assert refused.value.subject.lower() == (
        f"$JS.API.STREAM.PURGE.{N.envelope_stream}".lower())
    # A subject the server quotes with escapes is named as it was sent.
    for subject in ('bad."quoted"', "bad.back\\slash"):
        pending = await client.replies.send(subject, b"", None)
        with pytest.raises(PermissionDenied) as refused:
            await client.replies.wait(pending, within=timeout, what="a forbidden request")
        assert refused.value.subject == subject
    assert time.monotonic() - start < timeout / 2
    # The connection goes on: what the role allows still works.
    after = await client.open(participant="u")
    await after.send("still here")
    assert [e.content async for e in after.history()] == ["still here"]


class _PlainHistory(JetStreamHistory):
    """The framework integrations' history storage, with events stored as they are."""

    codec = (lambda value: value, lambda value: value)


@dataclass
class _Stream:
    id: str


@dataclass
class _Context:
    stream: _Stream


async def test_a_long_framework_history_reads_as_a_worker_with_no_refusal(
    provisioned: Secured, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the first page, the rest comes through a consumer the worker role may create."""
    url = provisioned.server.url
    admin = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "admin"))
    await _PlainHistory(bus=admin).set_history("conv", [])  # creates the stream
    worker = await bus_factory(url, nkey_seed_file=provisioned.seed("acme", "worker"))
    storage = _PlainHistory(bus=worker)
    await storage.set_history("conv", ["s0", "s1"])
    context = _Context(_Stream("conv"))
    events = [f"e{i}" for i in range(_seqread.FIRST_PAGE + _seqread.CONSUMER_PAST + 100)]
    for chunk in range(0, len(events), 100):
        await asyncio.gather(*(storage.save_event(e, context)
                               for e in events[chunk:chunk + 100]))
    consumed: list[int] = []
    consume = _seqread._consume

    async def counted(*args: Any, **kwargs: Any) -> None:
        consumed.append(1)
        await consume(*args, **kwargs)

    start = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_seqread, "_consume", counted)
        got = list(await storage.get_history("conv"))
    assert time.monotonic() - start < 2.0
    assert consumed == [1]
    assert got[:2] == ["s0", "s1"] and sorted(got[2:]) == sorted(events)
    assert [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()] == []


async def test_a_refusal_never_shows_the_credentials_of_a_server_url(secured: Secured) -> None:
    url = secured.server.url.replace("nats://", "nats://someone:hunter2@")
    settings = BusSettings(servers=(url,))
    with pytest.raises(AuthenticationFailed) as caught:
        await SessionBus(settings=settings).start()
    assert "hunter2" not in str(caught.value) and "someone" not in str(caught.value)
    assert "hunter2" not in repr(settings)
