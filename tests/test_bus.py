"""SessionBus: embedded server, connection, provisioning, refusal of old servers."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from sessionbus.bus._server import NatsServer, free_port
from sessionbus.bus.core import SessionBus
from sessionbus.bus.errors import BusClosedError, ConfigError, ConnectionFailed, ServerTooOld

from sessionbus.testing import BusFactory, ServerFactory

DEBIAN_SERVER = "/usr/sbin/nats-server"


async def test_embedded_server_starts_and_stops_with_the_bus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SESSIONBUS_URL", raising=False)
    async with SessionBus() as sb:
        assert sb.embedded is not None
        server = sb.embedded
        pid = server.pid
        assert pid is not None and server.running
        assert sb.url == server.url
        ack = await sb.js.publish(sb.names.inbound("hello"), b"x")
        assert ack.stream == sb.names.envelope_stream
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_embedded_server_keeps_a_given_data_dir(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SESSIONBUS_URL", raising=False)
    data = os.path.join(tmp_path, "data")
    async with SessionBus(data_dir=data) as sb:
        await sb.js.publish(sb.names.inbound("kept"), b"x")
    async with SessionBus(data_dir=data) as sb:
        info = await sb.js.stream_info(sb.names.envelope_stream)
        assert info.state.messages == 1


async def test_env_url_is_used(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONBUS_URL", nats_server.url)
    sb = await SessionBus.connect()
    try:
        assert sb.embedded is None
        assert sb.url == nats_server.url
    finally:
        await sb.close()


async def test_provisioning_is_idempotent_and_keeps_recorded_partitions(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    first = await bus_factory(nats_server.url, partitions=16)
    second = await bus_factory(nats_server.url)
    assert first.partitions == second.partitions == 16
    info = await second.js.stream_info(second.names.envelope_stream)
    assert info.config.max_consumers and info.config.max_consumers >= 16
    for bucket in (second.sessions_kv, second.registry_kv, second.workers_kv, second.locks_kv):
        status = await second.js.stream_info(bucket.stream)
        assert status.config.allow_msg_ttl
        assert status.config.max_msgs_per_subject == 1


async def test_stored_subject_matches_client_side_partition(bus: SessionBus) -> None:
    for sid in ["a", "call.with.dots", "*", "ünï", "x" * 1000]:
        ack = await bus.js.publish(bus.names.inbound(sid), b"x")
        msg = await bus.js.get_msg(bus.names.envelope_stream, seq=ack.seq)
        assert msg.subject == bus.names.stored(sid, bus.partitions)


async def test_dead_server_gives_connection_failed() -> None:
    port = free_port()
    with pytest.raises(ConnectionFailed) as info:
        await SessionBus.connect(f"nats://127.0.0.1:{port}", connect_timeout=1.0)
    assert str(port) in str(info.value)
    assert isinstance(info.value, OSError)


async def test_closed_bus_refuses_use(bus_factory: BusFactory, nats_server: NatsServer) -> None:
    sb = await bus_factory(nats_server.url)
    await sb.close()
    with pytest.raises(BusClosedError):
        _ = sb.js
    with pytest.raises(BusClosedError):
        await sb.start()


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        SessionBus("nats://127.0.0.1:1", partitions=0)
    with pytest.raises(ConfigError):
        SessionBus("nats://127.0.0.1:1", no_such_option=1)


async def test_cluster_provisioning_with_replicas(nats_cluster: object,
                                                  bus_factory: BusFactory) -> None:
    from sessionbus.bus._server import NatsCluster

    assert isinstance(nats_cluster, NatsCluster)
    sb = await bus_factory(nats_cluster.urls, replicas=3)
    info = await sb.js.stream_info(sb.names.envelope_stream)
    assert info.config.num_replicas == 3
    # At once, though the new streams may not take writes through this
    # node yet: the record write and the send are sent again until they do.
    session = await sb.open("s", participant="client", participants=["client", "g"])
    await session.send("x")
    info = await sb.js.stream_info(sb.names.envelope_stream)
    assert info.state.messages == 1


async def test_a_send_no_stream_takes_is_sent_again_then_fails_typed(
    nats_server_factory: ServerFactory, bus_factory: BusFactory,
) -> None:
    # Envelopes go nowhere ("no responders"); records and everything else work.
    server = nats_server_factory(extra_config='mappings = { "np.in.>": "nowhere.>" }')
    sb = await bus_factory(server.url, prefix="np", request_timeout=0.5)
    session = await sb.open("s", participant="client", participants=["client", "g"])
    start = time.monotonic()
    with pytest.raises(ConnectionFailed, match="sending into 's'"):
        await session.send("x")
    assert 0.4 <= time.monotonic() - start < 3.0


@pytest.mark.skipif(
    not shutil.which(DEBIAN_SERVER), reason="Debian's nats-server 2.9 not installed"
)
async def test_server_without_per_key_ttl_is_refused(
    nats_server_factory: ServerFactory,
) -> None:
    old = nats_server_factory(name="old", binary=DEBIAN_SERVER)
    with pytest.raises(ServerTooOld) as info:
        await SessionBus.connect(old.url)
    assert info.value.version.startswith("2.9")
    assert "2.11" in str(info.value)


async def test_existing_stream_with_other_partitions_or_replicas_is_refused(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    await bus_factory(f"{nats_server.url}?partitions=16&prefix=asked")
    with pytest.raises(ConfigError, match="exists with 16 partitions, not the 256 asked for"):
        await bus_factory(f"{nats_server.url}?partitions=256&prefix=asked")
    # The stream exists with 1 replica; asking for 3 must not silently run on 1.
    with pytest.raises(ConfigError, match=r"exists with 1 replica\(s\), not the 3 asked for"):
        await bus_factory(nats_server.url, prefix="asked", replicas=3)
    same = await bus_factory(nats_server.url, prefix="asked", replicas=1, partitions=16)
    assert (same.partitions, same.replicas) == (16, 1)


async def test_url_options_reach_the_bus_from_the_constructor(
    nats_server: NatsServer, bus_factory: BusFactory
) -> None:
    sb = await bus_factory(f"{nats_server.url},nats://127.0.0.1:1?prefix=viaurl&partitions=7")
    assert sb.settings.servers == (nats_server.url, "nats://127.0.0.1:1")
    assert (sb.settings.prefix, sb.partitions) == ("viaurl", 7)
    info = await sb.js.stream_info(sb.names.envelope_stream)
    assert info.config.subjects == ["viaurl.in.*"]
    text = repr(sb)
    assert "prefix='viaurl'" in text and "partitions=7" in text and "replicas=1" in text


async def test_connect_and_env_read_url_options(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = await SessionBus.connect(f"{nats_server.url}?prefix=conn&partitions=5")
    try:
        assert (sb.settings.prefix, sb.partitions) == ("conn", 5)
    finally:
        await sb.close()
    monkeypatch.setenv("SESSIONBUS_URL", f"{nats_server.url}?prefix=fromenv&partitions=3")
    async with SessionBus() as env_bus:
        assert (env_bus.settings.prefix, env_bus.partitions) == ("fromenv", 3)
    with pytest.raises(ConfigError, match="unknown URL option 'bogus'"):
        SessionBus(f"{nats_server.url}?bogus=1")


def test_a_server_with_sync_always_fsyncs_every_write() -> None:
    server = NatsServer(name="synced", sync_interval="always").start()
    try:
        assert server.monitor("varz")["jetstream"]["config"]["sync_always"] is True
    finally:
        server.stop()
    default = NatsServer(name="lazy").start()
    try:
        assert not default.monitor("varz")["jetstream"]["config"].get("sync_always")
    finally:
        default.stop()
