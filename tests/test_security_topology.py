"""TLS, leaf node credentials and route authentication with real nats-server processes.

A CA made for the test signs every server's certificate; the hub accepts
leaf connections only with a leaf user bound to the tenant's account, and
cluster nodes route to each other only with the cluster's credentials.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_procs import ROOT
from sessionbus.bus import AuthenticationFailed, ConfigError, SessionBus
from sessionbus.bus._permissions import Role
from sessionbus.bus._server import NatsServer, ServerTls, find_server_binary, free_port
from sessionbus.bus.settings import BusSettings
from sessionbus.workers import Turn, Worker
from worker_proc import FAST

from sessionbus._auth import AuthDir
from sessionbus._deployment import Deployment, generate
from sessionbus._tls import init_ca, issue
from sessionbus.testing import BusFactory, ServerFactory


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "tls")
    for name in ("hub", "leaf", "n1", "n2", "intruder"):
        issue(tmp_path / "tls", name, hosts=["127.0.0.1", "localhost"])
    return tmp_path / "tls"


def server_tls(tls_dir: Path, name: str) -> ServerTls:
    return ServerTls(cert_file=str(tls_dir / f"{name}.pem"),
                     key_file=str(tls_dir / f"{name}-key.pem"), ca_file=str(tls_dir / "ca.pem"))


def wait_until(cond: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def edge(tmp_path: Path, tls_dir: Path,
         nats_server_factory: ServerFactory) -> Iterator[tuple[NatsServer, NatsServer, AuthDir]]:
    auth = AuthDir.init(tmp_path / "auth", domains=("hub",))
    auth.add_tenant("acme")
    for role in Role:
        auth.add_user("acme", role.value, role)
    leaf_password = secrets.token_urlsafe(24)
    hub = nats_server_factory(
        name="hub", domain="hub", leaf_listen_port=0, tls=server_tls(tls_dir, "hub"),
        accounts_config=auth.accounts_config(),
        leaf_users=[("acme-edge", leaf_password, "acme")],
    )
    leaf = nats_server_factory(
        name="leaf", jetstream=False, tls=server_tls(tls_dir, "leaf"),
        accounts_config=auth.accounts_config(jetstream=False), leaf_account="acme",
        leaf_remotes=[f"nats-leaf://acme-edge:{leaf_password}@127.0.0.1:{hub.leaf_listen_port}"],
    )
    hub.wait_leafnodes(1)
    yield hub, leaf, auth


async def test_an_edge_site_with_credentials_serves_sessions_over_tls(
    edge: tuple[NatsServer, NatsServer, AuthDir], tls_dir: Path, bus_factory: BusFactory,
    nats_server_factory: ServerFactory,
) -> None:
    hub, leaf, auth = edge
    assert hub.url.startswith("tls://") and leaf.url.startswith("tls://")
    ca = str(tls_dir / "ca.pem")
    seed = {role: str(auth.seed_file("acme", role.value)) for role in Role}
    await (await bus_factory(hub.url, partitions=4, tls_ca_file=ca,
                             nkey_seed_file=seed[Role.ADMIN])).close()
    hub_worker = await bus_factory(hub.url, tls_ca_file=ca, nkey_seed_file=seed[Role.WORKER])
    edge_client = await bus_factory(f"{leaf.url}?domain=hub&tls_ca_file={ca}",
                                    nkey_seed_file=seed[Role.CLIENT])

    async def handle(turn: Turn) -> None:
        if turn.envelope.sender_id == "edge-user":
            await turn.reply(f"hub saw {turn.envelope.content}")

    worker = Worker(hub_worker, group="g", handler=handle, config=FAST)
    await worker.start()
    try:
        session = await edge_client.open(participant="edge-user")
        await session.send("hello from the edge")
        deadline = time.monotonic() + 15
        texts: list[str] = []
        while "hub saw hello from the edge" not in texts and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            texts = [e.content async for e in session.history()]
        assert texts == ["hello from the edge", "hub saw hello from the edge"]
        await session.close()
    finally:
        await worker.stop()

    # The same edge without the leaf credentials is refused by the hub.
    stranger = nats_server_factory(
        name="stranger", jetstream=False, tls=server_tls(tls_dir, "leaf"),
        leaf_remotes=[f"nats-leaf://127.0.0.1:{hub.leaf_listen_port}"],
    )
    await asyncio.to_thread(wait_until, lambda: "authorization" in stranger.log_tail(40).lower(),
                            "the hub to refuse the stranger's leaf connection")
    assert hub.monitor("leafz")["leafnodes"] == 1
    # Clients must speak TLS and trust the deployment's CA.
    with pytest.raises(AuthenticationFailed, match="TLS"):
        await SessionBus(hub.url, nkey_seed_file=seed[Role.CLIENT]).start()


def test_cluster_routes_need_the_cluster_credentials(tls_dir: Path) -> None:
    user, password = "route", secrets.token_urlsafe(24)
    nodes = [NatsServer(name=n, jetstream=False, cluster_name="c", tls=server_tls(tls_dir, n),
                        cluster_auth=(user, password)) for n in ("n1", "n2")]
    for node in nodes:
        node.assign_ports()
    nodes[0].routes = [f"nats-route://{user}:{password}@127.0.0.1:{nodes[1].cluster_port}"]
    nodes[1].routes = [f"nats-route://{user}:{password}@127.0.0.1:{nodes[0].cluster_port}"]
    intruder = NatsServer(name="intruder", jetstream=False, cluster_name="c",
                          tls=server_tls(tls_dir, "intruder"),
                          routes=[f"nats-route://127.0.0.1:{nodes[0].cluster_port}"])
    try:
        for node in nodes:
            node.start()
        wait_until(lambda: all(n.monitor("routez")["num_routes"] >= 1 for n in nodes),
                   "the two nodes to route to each other")
        intruder.start()
        wait_until(lambda: "authorization" in intruder.log_tail(40).lower(),
                   "n1 to refuse the intruder's route")
        assert intruder.monitor("routez")["num_routes"] == 0
        assert [r["remote_name"] for r in nodes[0].monitor("routez")["routes"]] \
            == ["n2"] * nodes[0].monitor("routez")["num_routes"]
    finally:
        intruder.stop()
        for node in nodes:
            node.stop()


def test_credentials_come_from_the_url_or_the_environment_and_never_show(
    tmp_path: Path,
) -> None:
    seed = tmp_path / "u.nk"
    seed.write_bytes(b"SU...\n")
    env = {"SESSIONBUS_URL": "tls://h:4222", "SESSIONBUS_NKEY_SEED_FILE": str(seed),
           "SESSIONBUS_TLS_CA_FILE": str(seed), "SESSIONBUS_TOKEN": "t0ken-secret"}
    s = BusSettings.from_env(env)
    assert (s.nkey_seed_file, s.tls_ca_file, s.token) == (str(seed), str(seed), "t0ken-secret")
    # A URL's own credentials win over the environment's, which are then unused.
    s = BusSettings.from_env(env, url="nats://alice:pa55word@h:4222")
    assert (s.user, s.password, s.token, s.nkey_seed_file) == ("alice", "pa55word", None, None)
    assert s.tls_ca_file == str(seed)
    for text in (repr(s), str(s.describe())):
        assert "pa55word" not in text and "t0ken" not in text
    s = BusSettings.from_url(f"nats://h:4222?nkey_seed_file={seed}")
    assert s.nkey_seed_file == str(seed)
    with pytest.raises(ConfigError, match="not a readable file"):
        BusSettings.from_url("nats://h:4222?creds_file=/nonexistent/x.creds").connect_options()
    assert os.environ.get("SESSIONBUS_TOKEN") is None


# -- the deploy configs themselves, run as processes ----------------------------------


class ConfProcess:
    """A nats-server started on a config file as written, stopped by PID."""

    def __init__(self, conf: Path, http_port: int) -> None:
        self.conf, self.http_port = conf, http_port
        self.log = conf.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([find_server_binary(), "-c", str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz",
                                        timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[dict[str, int], Deployment]]:
    """deploy/n1-n3.conf and edge.conf with their generated secrets, on loopback ports.

    Only what cannot work on one host is rewritten: compose host names and
    the fixed ports become 127.0.0.1 and free ports, container paths become
    temporary directories. TLS, accounts, route and leaf credentials are
    the files as shipped.
    """
    deployment = generate(tmp_path / "secrets")
    names = ("n1", "n2", "n3", "edge")
    ports = {f"{n}:{kind}": free_port() for n in names for kind in ("4222", "8222", "6222",
                                                                     "7422")}
    for include in ("routes.conf", "edge-remote.conf"):
        path = tmp_path / "secrets" / include
        text = path.read_text()
        for n in names:
            for kind in ("6222", "7422"):
                text = text.replace(f"@{n}:{kind}", f"@127.0.0.1:{ports[f'{n}:{kind}']}")
        path.write_text(text)
    procs: list[ConfProcess] = []
    try:
        for n in names:
            text = (ROOT / "deploy" / f"{n}.conf").read_text()
            text = text.replace("/etc/nats/secrets", str(tmp_path / "secrets"))
            text = text.replace("/data/jetstream", str(tmp_path / "data" / n))
            for kind in ("4222", "8222", "6222", "7422"):
                text = text.replace(f"0.0.0.0:{kind}", f"127.0.0.1:{ports[f'{n}:{kind}']}")
            conf = tmp_path / f"{n}.conf"
            conf.write_text(text)
            procs.append(ConfProcess(conf, ports[f"{n}:8222"]))
        wait_until(lambda: all(p.healthy() for p in procs),
                   "the cluster and the edge to be healthy", within=30)
        yield ports, deployment
    finally:
        for p in procs:
            p.stop()


async def test_the_deploy_configs_serve_an_edge_client_only_with_credentials(
    deployment: tuple[dict[str, int], Deployment], bus_factory: BusFactory,
) -> None:
    all_ports, secrets_ = deployment
    ports = {n: all_ports[f"{n}:4222"] for n in ("n1", "n2", "n3", "edge")}
    ca = str(secrets_.ca_file)
    cluster = ",".join(f"tls://127.0.0.1:{ports[n]}" for n in ("n1", "n2", "n3"))
    seed = {r: str(secrets_.seed_file("default", r.value)) for r in Role}
    admin = await bus_factory(f"{cluster}?replicas=3&partitions=4&tls_ca_file={ca}",
                              nkey_seed_file=seed[Role.ADMIN])
    await admin.close()
    worker_bus = await bus_factory(f"{cluster}?tls_ca_file={ca}",
                                   nkey_seed_file=seed[Role.WORKER])
    edge_client = await bus_factory(f"tls://127.0.0.1:{ports['edge']}?domain=hub"
                                    f"&tls_ca_file={ca}", nkey_seed_file=seed[Role.CLIENT])

    async def handle(turn: Turn) -> None:
        if turn.envelope.sender_id == "edge-user":
            await turn.reply(f"cluster: {turn.envelope.content}")

    worker = Worker(worker_bus, group="echo", handler=handle, config=FAST)
    await worker.start()
    try:
        session = await edge_client.open(participant="edge-user")
        await session.send("hi")
        deadline = time.monotonic() + 20
        texts: list[str] = []
        while "cluster: hi" not in texts and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            texts = [e.content async for e in session.history()]
        assert texts == ["hi", "cluster: hi"]
    finally:
        await worker.stop()
    for url in (f"tls://127.0.0.1:{ports['n1']}?tls_ca_file={ca}",
                f"tls://127.0.0.1:{ports['edge']}?domain=hub&tls_ca_file={ca}"):
        with pytest.raises(AuthenticationFailed):
            await SessionBus(url).start()
    # A route without the cluster's credentials is refused.
    intruder_conf = Path(str(secrets_.root)).parent / "intruder.conf"
    intruder_conf.write_text(
        "server_name: intruder\nlisten: 127.0.0.1:-1\n"
        f"http: 127.0.0.1:{(http := free_port())}\n"
        "cluster {\n  name: sessionbus\n  listen: 127.0.0.1:-1\n"
        f"  routes: [\"nats-route://127.0.0.1:{all_ports['n1:6222']}\"]\n"
        f"  tls {{ cert_file: \"{secrets_.root}/tls/n1.pem\", "
        f"key_file: \"{secrets_.root}/tls/n1-key.pem\", ca_file: \"{ca}\" }}\n}}\n")
    intruder = ConfProcess(intruder_conf, http)
    try:
        await asyncio.to_thread(wait_until, lambda: "authoriz" in intruder.log.read_text()
                                .lower() or "authentication" in intruder.log.read_text().lower(),
                                "n1 to refuse a route without credentials")
    finally:
        intruder.stop()



async def test_a_server_that_verifies_clients_needs_their_certificate(
    tls_dir: Path, nats_server_factory: ServerFactory, bus_factory: BusFactory,
) -> None:
    tls = server_tls(tls_dir, "hub")
    server = nats_server_factory(name="mtls", tls=ServerTls(
        cert_file=tls.cert_file, key_file=tls.key_file, ca_file=tls.ca_file,
        verify_clients=True))
    client = issue(tls_dir, "alice")  # a client certificate: no host names
    ca = str(tls_dir / "ca.pem")
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed):
        await SessionBus(f"{server.url}?tls_ca_file={ca}").start()
    assert time.monotonic() - started < 3
    bus = await bus_factory(f"{server.url}?tls_ca_file={ca}&tls_cert_file={client.cert_file}"
                            f"&tls_key_file={client.key_file}")
    session = await bus.open()
    await session.send("over mutual TLS")
    assert [e.content async for e in session.history()] == ["over mutual TLS"]
