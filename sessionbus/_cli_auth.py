"""``sessionbus tenants | users | tls | deploy secrets``: who may connect, and with what.

::

    sessionbus tenants add acme --auth ./auth        # a NATS account with its own JetStream
    sessionbus users add acme alice --role client --auth ./auth
    sessionbus users add acme w1 --role worker --group echo --auth ./auth
    sessionbus users rotate acme alice --auth ./auth # new seed; the old one stops working
    sessionbus server --auth ./auth                  # nats-server with those accounts
    sessionbus tenants leaf acme site1 --auth ./auth # an edge site's leaf credentials
    sessionbus tls init ./tls && sessionbus tls issue ./tls n1 --host n1
    sessionbus deploy secrets deploy/secrets         # everything docker-compose.yml needs

``--auth`` defaults to ``$SESSIONBUS_AUTH_DIR``. A running ``sessionbus server
--auth DIR`` reloads the accounts by itself when they change; any other
nats-server including the generated ``accounts.conf`` needs a reload
(``nats-server --signal reload``). Seeds are written with mode 0600 and
their path is printed, never their content.
"""

from __future__ import annotations

import argparse
import os

from sessionbus._auth import AuthDir, _write_private
from sessionbus._cli_common import Commands, add_command, note
from sessionbus._deployment import generate
from sessionbus._tls import init_ca, issue
from sessionbus.bus._permissions import Role
from sessionbus.bus.errors import ConfigError

__all__ = ["AUTH_DIR_ENV", "add_parsers"]

#: Environment variable naming the auth directory of ``--auth``.
AUTH_DIR_ENV = "SESSIONBUS_AUTH_DIR"


def _auth_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auth", metavar="DIR", default=os.environ.get(AUTH_DIR_ENV),
                        help=f"the auth directory (default: ${AUTH_DIR_ENV})")


def _auth_dir(args: argparse.Namespace, *, create: bool = False) -> AuthDir:
    if not args.auth:
        raise ConfigError(f"no auth directory: give --auth DIR or set {AUTH_DIR_ENV}")
    auth = AuthDir(args.auth)
    if not auth.exists:
        if not create:
            raise ConfigError(f"{args.auth} is not an auth directory "
                              "(create it with 'sessionbus tenants add NAME --auth DIR')")
        # A new directory permits the bus prefix of --prefix (default sb).
        auth = AuthDir.init(args.auth, prefixes=(getattr(args, "prefix", None) or "sb",),
                            domains=tuple(getattr(args, "domains", None) or ()))
    return auth


def add_parsers(commands: Commands) -> None:
    """Register ``tenants``, ``users``, ``tls`` and ``deploy``."""
    tenants = add_command(commands, "tenants", help="add | ls | rm: tenants (NATS accounts)",
                          description="Tenants: one NATS account each, with its own JetStream.")
    sub = tenants.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    p = add_command(sub, "add", help="add a tenant (creates the auth directory if needed)")
    p.add_argument("name")
    p.add_argument("--domain", dest="domains", action="append", metavar="DOMAIN",
                   help="JetStream domain clients reach through leaf nodes, for a new "
                        "directory (repeat; e.g. hub)")
    _auth_option(p)
    p.set_defaults(func=_tenants_add, needs_bus=False)
    p = add_command(sub, "ls", help="list tenants and their users")
    _auth_option(p)
    p.set_defaults(func=_tenants_ls, needs_bus=False)
    p = add_command(sub, "rm", help="remove a tenant and its users' seeds")
    p.add_argument("name")
    _auth_option(p)
    p.set_defaults(func=_tenants_rm, needs_bus=False)
    p = add_command(sub, "leaf", help="let an edge site's leaf node join the tenant")
    p.add_argument("tenant")
    p.add_argument("name", help="the edge site")
    p.add_argument("--remove", action="store_true", help="refuse it from the next reload on")
    _auth_option(p)
    p.set_defaults(func=_tenants_leaf, needs_bus=False)

    users = add_command(commands, "users", help="add | ls | rotate | rm: users of a tenant",
                        description="Users of a tenant, each with a role and an NKey seed.")
    sub = users.add_subparsers(dest="users_command", metavar="COMMAND", required=True)
    p = add_command(sub, "add", help="add a user and write its seed file")
    p.add_argument("tenant")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--group", help="bind a worker to this group (its leases and consumers)")
    p.add_argument("--partitions", type=int, default=64,
                   help="partitions of the envelope stream, for --group (default: %(default)s)")
    p.add_argument("--only-prefix", action="append", default=[], metavar="PREFIX",
                   help="bind the user to this bus prefix (repeat; default: every prefix of "
                        "the directory)")
    _auth_option(p)
    p.set_defaults(func=_users_add, needs_bus=False)
    p = add_command(sub, "ls", help="list users")
    p.add_argument("tenant", nargs="?")
    _auth_option(p)
    p.set_defaults(func=_users_ls, needs_bus=False)
    for name, func, what in (("rotate", _users_rotate, "give a user a new seed"),
                             ("rm", _users_rm, "remove a user and its seed")):
        p = add_command(sub, name, help=what)
        p.add_argument("tenant")
        p.add_argument("name")
        _auth_option(p)
        p.set_defaults(func=func, needs_bus=False)

    tls = add_command(commands, "tls", help="init | issue: a private CA and its certificates",
                      description="A CA for one deployment, and the certificates it signs.")
    sub = tls.add_subparsers(dest="tls_command", metavar="COMMAND", required=True)
    p = add_command(sub, "init", help="create the CA (ca.pem, ca-key.pem) in DIR")
    p.add_argument("dir")
    p.set_defaults(func=_tls_init, needs_bus=False)
    p = add_command(sub, "issue", help="sign NAME.pem / NAME-key.pem with the CA in DIR")
    p.add_argument("dir")
    p.add_argument("name")
    p.add_argument("--host", action="append", default=[],
                   help="a name or address the server is reached by (repeat); none: a "
                        "client certificate")
    p.set_defaults(func=_tls_issue, needs_bus=False)

    deploy = add_command(commands, "deploy", help="secrets DIR: generate a deployment's secrets",
                         description="Secrets of the docker-compose deployment.")
    sub = deploy.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)
    p = add_command(sub, "secrets", help="CA, certificates, route and leaf credentials, "
                                         "tenants and users for deploy/*.conf")
    p.add_argument("dir", nargs="?", default="deploy/secrets")
    p.add_argument("--node", action="append", default=[], help="cluster node name (repeat; "
                   "default: n1 n2 n3)")
    p.add_argument("--edge", action="append", default=[],
                   help="edge leaf node name (repeat; default: edge)")
    p.add_argument("--tenant", action="append", default=[], help="tenant (default: default)")
    p.add_argument("--rotate", action="store_true", help="new route and leaf passwords")
    p.set_defaults(func=_deploy_secrets, needs_bus=False)


def _reload_hint() -> None:
    note("note: a running 'sessionbus server --auth' picks this up by itself; reload any "
         "other nats-server using accounts.conf (nats-server --signal reload)")


def _tenants_add(args: argparse.Namespace) -> int:
    auth = _auth_dir(args, create=True)
    auth.add_tenant(args.name)
    print(f"tenant {args.name} added in {auth.path}")
    _reload_hint()
    return 0


def _tenants_ls(args: argparse.Namespace) -> int:
    auth = _auth_dir(args)
    for tenant in auth.tenants():
        users = ", ".join(f"{u.name} ({u.role.value})" for u in auth.users(tenant))
        print(f"{tenant}: {users or 'no users'}")
    return 0


def _tenants_rm(args: argparse.Namespace) -> int:
    _auth_dir(args).remove_tenant(args.name)
    print(f"tenant {args.name} removed (its streams stay on the servers)")
    _reload_hint()
    return 0


def _tenants_leaf(args: argparse.Namespace) -> int:
    auth = _auth_dir(args)
    if args.remove:
        auth.remove_leaf(args.tenant, args.name)
        print(f"leaf {args.name} of tenant {args.tenant} removed")
        _reload_hint()
        return 0
    credentials = auth.add_leaf(args.tenant, args.name)
    path = auth.path / "leafs" / f"{args.tenant}-{args.name}.url"
    _write_private(path, f"nats-leaf://{credentials}@HUB:7422\n".encode())
    print(f"leaf {args.name} of tenant {args.tenant} added; its remote URL (replace HUB): "
          f"{path}")
    print(f"at the edge: sessionbus server --no-jetstream --auth DIR --leaf-account "
          f"{args.tenant} --leaf-remote \"$(cat {path})\"")
    _reload_hint()
    return 0


def _users_add(args: argparse.Namespace) -> int:
    auth = _auth_dir(args)
    partitions = args.partitions if args.group else None
    path = auth.add_user(args.tenant, args.name, args.role, group=args.group,
                         partitions=partitions, prefixes=tuple(args.only_prefix) or None)
    print(f"user {args.tenant}/{args.name} ({args.role}) added; its seed: {path}")
    print(f"connect with: SESSIONBUS_NKEY_SEED_FILE={path}")
    _reload_hint()
    return 0


def _users_ls(args: argparse.Namespace) -> int:
    for user in _auth_dir(args).users(args.tenant):
        group = f" group={user.group}" if user.group else ""
        only = f" prefixes={','.join(user.prefixes)}" if user.prefixes else ""
        print(f"{user.tenant}/{user.name}  {user.role.value}{group}{only}  {user.nkey}")
    return 0


def _users_rotate(args: argparse.Namespace) -> int:
    path = _auth_dir(args).rotate_user(args.tenant, args.name)
    print(f"user {args.tenant}/{args.name} has a new seed: {path} (the old one is refused "
          "once the server reloads)")
    _reload_hint()
    return 0


def _users_rm(args: argparse.Namespace) -> int:
    _auth_dir(args).remove_user(args.tenant, args.name)
    print(f"user {args.tenant}/{args.name} removed")
    _reload_hint()
    return 0


def _tls_init(args: argparse.Namespace) -> int:
    print(f"CA certificate: {init_ca(args.dir)}")
    return 0


def _tls_issue(args: argparse.Namespace) -> int:
    issued = issue(args.dir, args.name, hosts=args.host)
    print(f"certificate: {issued.cert_file}\nkey: {issued.key_file}")
    return 0


def _deploy_secrets(args: argparse.Namespace) -> int:
    deployment = generate(args.dir, nodes=args.node or ("n1", "n2", "n3"),
                          edges=args.edge or ("edge",), tenants=args.tenant or ("default",),
                          rotate=args.rotate)
    print(f"deployment secrets in {deployment.root} (CA: {deployment.ca_file})")
    for user in deployment.auth.users():
        print(f"  {user.tenant}/{user.name} ({user.role.value}): "
              f"{deployment.seed_file(user.tenant, user.name)}")
    return 0
