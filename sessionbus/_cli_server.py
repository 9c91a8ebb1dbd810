"""``sessionbus server``: the embedded nats-server with JetStream, in the foreground.

It runs :class:`~sessionbus.bus._server.NatsServer` with a generated config: a client
port, a data directory, and optionally a cluster (``--cluster-name``,
``--cluster-port``, ``--routes``), leaf node connections accepted from edge
sites (``--leaf-port``), or a connection to a hub as a leaf node
(``--leaf-remote``). SIGINT or SIGTERM stops the server (SIGTERM, then
SIGKILL after a grace period) and the command exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import types
from collections.abc import Iterator

from sessionbus._auth import LEAFS_FILE, STATE_FILE, AuthDir
from sessionbus._cli_common import Commands, add_command
from sessionbus.bus._server import NatsServer, ServerTls, server_version
from sessionbus.bus.errors import ConfigError, ConnectionFailed
from sessionbus.bus.settings import URL_ENV

__all__ = ["add_parser", "run_server"]

_POLL = 0.2
#: ``[pid] date time [LVL] `` in front of a nats-server log line.
_LOG_PREFIX = re.compile(r"^.*?\[(?:FTL|ERR|WRN|INF|DBG|TRC)\]\s*")


def add_parser(commands: Commands) -> None:
    """Register ``server``."""
    p = add_command(
        commands, "server", help="run the embedded nats-server with JetStream in the foreground",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 for every one)")
    p.add_argument("--port", type=int, default=4222, help="client port (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=0,
                   help="monitoring port (default: a free one)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="keep JetStream data here (default: a temporary directory, removed "
                        "on exit)")
    p.add_argument("--name", default="sessionbus", help="server name (default: %(default)s)")
    p.add_argument("--domain", help="JetStream domain of this server (e.g. hub)")
    p.add_argument("--sync-interval", metavar="always|DURATION",
                   help="fsync JetStream's files after every write ('always') or this often "
                        "(e.g. 1s; default: the server's, 2m): bounds what a machine crash "
                        "loses (a crash of nats-server alone loses nothing acked)")
    p.add_argument("--no-jetstream", action="store_true",
                   help="run without JetStream (a leaf node whose clients use the hub's)")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--cluster-name", help="join or form the cluster of this name")
    cluster.add_argument("--cluster-port", type=int, default=0,
                         help="route port for other nodes (default: a free one)")
    cluster.add_argument("--routes", action="append", default=[], metavar="URL",
                         help="route to another node, e.g. nats-route://10.0.0.2:6222 "
                              "(repeat, or comma-separate)")
    leaf = p.add_argument_group("leaf nodes")
    leaf.add_argument("--leaf-port", type=int, default=None,
                      help="accept leaf node connections on this port (hub side)")
    leaf.add_argument("--leaf-remote", action="append", default=[], metavar="URL",
                      help="connect to a hub as a leaf node, e.g. nats-leaf://hub:7422; "
                           "repeat (or comma-separate) for the nodes of one hub cluster: "
                           "one leaf connection that fails over between them")
    leaf.add_argument("--leaf-account", metavar="TENANT",
                      help="with --auth: the tenant whose account the leaf connection "
                           "carries (its URL holds that tenant's leaf credentials: "
                           "'sessionbus tenants leaf')")
    secure = p.add_argument_group("security")
    secure.add_argument("--auth", metavar="DIR",
                        help="require credentials: the tenants and users of this auth "
                             "directory ('sessionbus tenants add'); reloaded when it changes")
    secure.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate")
    secure.add_argument("--tls-key", metavar="FILE", help="... and this key")
    secure.add_argument("--tls-ca", metavar="FILE",
                        help="the CA that signs routes' and leaf nodes' certificates")
    secure.add_argument("--tls-verify", action="store_true",
                        help="clients must present a certificate signed by --tls-ca")
    p.set_defaults(func=run_server, needs_bus=False)


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def build_server(args: argparse.Namespace) -> NatsServer:
    """The :class:`NatsServer` the arguments describe (not started)."""
    routes = _split(args.routes)
    if routes and not args.cluster_name:
        raise ConfigError("--routes needs --cluster-name")
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            raise ConfigError("TLS needs --tls-cert, --tls-key and --tls-ca")
        tls = ServerTls(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca,
                        verify_clients=args.tls_verify)
    accounts = ""
    leaf_users: list[tuple[str, str, str]] = []
    if args.auth:
        auth = AuthDir(args.auth)
        if not auth.exists:
            raise ConfigError(f"{args.auth} is not an auth directory "
                              "(create it with 'sessionbus tenants add NAME --auth DIR')")
        accounts = auth.accounts_config(jetstream=not args.no_jetstream)
        leaf_users = auth.leaf_users()
    elif args.leaf_account:
        raise ConfigError("--leaf-account needs --auth (the tenant's account is defined there)")
    return NatsServer(
        name=args.name, host=args.host, port=args.port, http_port=args.http_port,
        jetstream=not args.no_jetstream, store_dir=args.data_dir, domain=args.domain,
        sync_interval=args.sync_interval,
        cluster_name=args.cluster_name, cluster_port=args.cluster_port, routes=routes,
        leaf_listen_port=args.leaf_port, leaf_remotes=_split(args.leaf_remote),
        tls=tls, accounts_config=accounts, leaf_users=leaf_users,
        leaf_account=args.leaf_account,
    )


def _failure(server: NatsServer, headline: str) -> ConnectionFailed:
    """One line: what happened and the server's own last fatal or error line."""
    lines = [line.strip() for line in server.log_tail(40).splitlines() if line.strip()]
    worst = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
    detail = (worst or lines or [""])[-1]
    detail = _LOG_PREFIX.sub("", detail)
    return ConnectionFailed(f"{headline}: {detail}" if detail else headline)


def _exit_failure(server: NatsServer) -> ConnectionFailed:
    """One line for a server that stopped by itself: how it ended, and its last error if any.

    Only a fatal or error line of the log is quoted: after a SIGKILL the
    last line is an old "Server is ready", which says nothing about the end.
    """
    code = server.process.poll() if server.process is not None else None
    pid = server.process.pid if server.process is not None else "?"
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    headline = f"nats-server (pid {pid}) {how}"
    if code is not None and code < 0:
        headline += " (not by this command)"
    lines = [line.strip() for line in server.log_tail(40).splitlines() if line.strip()]
    worst = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
    if worst:
        headline += f"; last error: {_LOG_PREFIX.sub('', worst[-1])}"
    return ConnectionFailed(headline)


@contextlib.contextmanager
def _signals_set(event: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: types.FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_server(args: argparse.Namespace) -> int:
    """Start the server, print where it is, wait for a signal, stop it."""
    server = build_server(args)
    stop = threading.Event()
    with _signals_set(stop):
        try:
            server.start(timeout=30.0)
        except ConnectionFailed:
            error = _failure(server, f"nats-server did not start on {args.host}:{args.port}")
            server.stop()
            raise error from None
        try:
            _announce(server)
            watched = _auth_stamp(args)
            while not stop.wait(_POLL):
                if not server.running:
                    raise _exit_failure(server)
                stamp = _auth_stamp(args)
                if stamp != watched:
                    watched = stamp
                    auth = AuthDir(args.auth)
                    server.accounts_config = auth.accounts_config(
                        jetstream=not args.no_jetstream)
                    server.leaf_users = auth.leaf_users()
                    server.reload()
                    print("accounts changed: nats-server reloaded", file=sys.stderr, flush=True)
        finally:
            print("stopping nats-server", file=sys.stderr, flush=True)
            server.stop(grace=10.0)
    return 0


def _auth_stamp(args: argparse.Namespace) -> tuple[int, ...] | None:
    """When the auth directory's users and leaf nodes last changed (None without ``--auth``)."""
    if not args.auth:
        return None
    stamps = []
    for name in (STATE_FILE, LEAFS_FILE):
        try:
            stamps.append(os.stat(os.path.join(args.auth, name)).st_mtime_ns)
        except OSError:
            stamps.append(0)
    return tuple(stamps)


def _announce(server: NatsServer) -> None:
    print(f"nats-server {server_version(server.binary)} running, pid {server.pid}")
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    url = f"{'tls' if server.tls else 'nats'}://{host}:{server.port}"
    print(f"  client URL:  {url}")
    print(f"  monitoring:  http://{server.host}:{server.http_port}")
    if server.jetstream:
        domain = f" (domain {server.domain})" if server.domain else ""
        print(f"  JetStream:   {server.store_dir or 'temporary directory'}{domain}")
    if server.cluster_name:
        print(f"  cluster:     {server.cluster_name}, routes on port {server.cluster_port}")
    if server.leaf_listen_port is not None:
        print(f"  leaf nodes:  nats-leaf://{server.host}:{server.leaf_listen_port}")
    for remote in server.leaf_remotes:
        print(f"  leaf of:     {remote}")
    if server.accounts_config:
        print("  auth:        credentials required (tenants and users of --auth)")
    print(f"Use it with: export {URL_ENV}={url}   (Ctrl-C to stop)", flush=True)
