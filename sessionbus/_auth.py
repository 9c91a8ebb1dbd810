"""Tenants and users of a secured deployment, kept in one directory.

``sessionbus server --auth DIR`` runs nats-server with the accounts this
directory describes; ``sessionbus tenants`` and ``sessionbus users`` change
it. The directory holds:

``auth.json``
    The tenants (one NATS account each, with its own JetStream), their users
    (role, NKey public key, optional worker group) and the bus prefixes and
    JetStream domains permissions are generated for. Public keys only.
``accounts.conf``
    The ``accounts`` block nats-server loads, regenerated on every change
    (a hand-written server config can ``include`` it).
``users/<tenant>/<user>.nk``
    Each user's NKey seed (mode 0600): the secret a client connects with
    (``SESSIONBUS_NKEY_SEED_FILE``, or ``?nkey_seed_file=`` in the URL).
``leafs.json``
    The passwords of the edge sites' leaf nodes, per tenant (mode 0600).

Users authenticate by NKey: the server keeps only public keys and checks a
signature of its nonce, so neither ``auth.json`` nor ``accounts.conf``
holds a secret. Rotating a user writes a new seed and a new public key; a
running server picks it up on reload (``nats-server --signal reload``, or
SIGHUP), and the old seed is refused from then on.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from sessionbus.bus._names import validate_id, validate_prefix
from sessionbus.bus._permissions import Role, role_permissions
from sessionbus.bus.errors import ConfigError

__all__ = ["ACCOUNTS_FILE", "STATE_FILE", "AuthDir", "User", "new_user_seed", "seed_public_key"]

STATE_FILE = "auth.json"
ACCOUNTS_FILE = "accounts.conf"
LEAFS_FILE = "leafs.json"
_VERSION = 1


def new_user_seed() -> bytes:
    """A fresh user NKey seed (``SU...``)."""
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    return seed


def seed_public_key(seed: bytes) -> str:
    """The public key (``U...``) of a user seed."""
    try:
        key: bytes = nkeys.from_seed(bytearray(seed.strip())).public_key
    except (nkeys.NkeysError, ValueError) as e:
        raise ConfigError(f"not an NKey seed: {e}") from None
    return key.decode("ascii")


@dataclass(frozen=True)
class User:
    """One user of a tenant: its role, NKey public key and (workers) group."""

    tenant: str
    name: str
    role: Role
    nkey: str
    group: str | None = None
    partitions: int | None = None
    #: The bus prefixes this user may use; None: every prefix of the directory.
    prefixes: tuple[str, ...] | None = None


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AuthDir:
    """The tenants and users of one deployment (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._state: dict[str, Any] = {"version": _VERSION, "prefixes": ["sb"],
                                       "domains": [], "tenants": {}}
        state_file = self.path / STATE_FILE
        if state_file.exists():
            try:
                self._state = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {state_file}: {e}") from None

    @classmethod
    def init(cls, path: str | os.PathLike[str], *, prefixes: tuple[str, ...] = ("sb",),
             domains: tuple[str, ...] = ()) -> AuthDir:
        """Create (or reopen) the directory, with the prefixes and domains to permit."""
        auth = cls(path)
        auth._state["prefixes"] = sorted({validate_prefix(p) for p in prefixes})
        auth._state["domains"] = sorted({validate_id(d, "domain") for d in domains})
        auth.save()
        return auth

    @property
    def exists(self) -> bool:
        """Whether the directory has been initialised."""
        return (self.path / STATE_FILE).exists()

    @property
    def accounts_file(self) -> Path:
        """The generated ``accounts`` block."""
        return self.path / ACCOUNTS_FILE

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Bus prefixes users get permissions on."""
        return tuple(self._state["prefixes"])

    @property
    def domains(self) -> tuple[str, ...]:
        """JetStream domains whose API subjects users get permissions on."""
        return tuple(self._state["domains"])

    def tenants(self) -> list[str]:
        """Every tenant, sorted."""
        return sorted(self._state["tenants"])

    def users(self, tenant: str | None = None) -> list[User]:
        """Every user (of one tenant, if given), sorted by tenant and name."""
        found = []
        for t in ([self._tenant(tenant)] if tenant else self.tenants()):
            for name, u in sorted(self._state["tenants"][t]["users"].items()):
                prefixes = tuple(u["prefixes"]) if u.get("prefixes") else None
                found.append(User(tenant=t, name=name, role=Role(u["role"]), nkey=u["nkey"],
                                  group=u.get("group"), partitions=u.get("partitions"),
                                  prefixes=prefixes))
        return found

    def seed_file(self, tenant: str, user: str) -> Path:
        """Where a user's seed is kept."""
        return self.path / "users" / tenant / f"{user}.nk"

    # -- changes --------------------------------------------------------------

    def add_tenant(self, name: str) -> None:
        """Add a tenant (a NATS account with JetStream enabled)."""
        _check_name(name, "tenant")
        tenants = self._state["tenants"]
        if name in tenants:
            raise ConfigError(f"tenant {name!r} already exists")
        tenants[name] = {"users": {}}
        self.save()

    def remove_tenant(self, name: str) -> None:
        """Remove a tenant and its users' seeds (its JetStream data stays on the servers)."""
        self._tenant(name)
        for user in self.users(name):
            self.seed_file(name, user.name).unlink(missing_ok=True)
        del self._state["tenants"][name]
        self.save()

    def add_user(self, tenant: str, name: str, role: Role | str, *, group: str | None = None,
                 partitions: int | None = None,
                 prefixes: tuple[str, ...] | None = None) -> Path:
        """Add a user with a new seed; return the seed file's path.

        ``prefixes`` binds the user to those buses of the tenant (default:
        every prefix of the directory): clients bound to different prefixes
        cannot see, send into or close each other's sessions.
        """
        _check_name(name, "user")
        users = self._state["tenants"][self._tenant(tenant)]["users"]
        if name in users:
            raise ConfigError(f"user {name!r} of tenant {tenant!r} already exists")
        role = Role(role)
        if prefixes is not None:
            prefixes = tuple(sorted({validate_prefix(p) for p in prefixes}))
        try:
            role_permissions(role, prefixes=prefixes or self.prefixes, group=group,
                             partitions=partitions)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        seed = new_user_seed()
        users[name] = {"role": role.value, "nkey": seed_public_key(seed), "group": group,
                       "partitions": partitions, "prefixes": list(prefixes or ())}
        path = self.seed_file(tenant, name)
        _write_private(path, seed + b"\n")
        self.save()
        return path

    def rotate_user(self, tenant: str, name: str) -> Path:
        """Give a user a new seed; the old one is refused once the server reloads."""
        user = self._user(tenant, name)
        seed = new_user_seed()
        user["nkey"] = seed_public_key(seed)
        path = self.seed_file(tenant, name)
        _write_private(path, seed + b"\n")
        self.save()
        return path

    def remove_user(self, tenant: str, name: str) -> None:
        """Remove a user and its seed."""
        self._user(tenant, name)
        del self._state["tenants"][tenant]["users"][name]
        self.seed_file(tenant, name).unlink(missing_ok=True)
        self.save()

    # -- leaf node credentials -------------------------------------------------

    @property
    def _leafs_file(self) -> Path:
        return self.path / LEAFS_FILE

    def _leafs(self) -> dict[str, dict[str, str]]:
        if not self._leafs_file.exists():
            return {}
        leafs: dict[str, dict[str, str]] = json.loads(self._leafs_file.read_text("utf-8"))
        return leafs

    def add_leaf(self, tenant: str, name: str) -> str:
        """Let an edge site's leaf node join as ``<tenant>-<name>``; return its remote URL
        credentials (``user:password``) to put in the edge's ``--leaf-remote`` URL.

        Leaf passwords are secrets: they are kept in ``leafs.json`` (mode 0600),
        apart from ``auth.json``. Adding a name again gives it a new password.
        """
        _check_name(name, "leaf")
        self._tenant(tenant)
        leafs = self._leafs()
        leafs.setdefault(tenant, {})[name] = secrets.token_urlsafe(32)
        _write_private(self._leafs_file, json.dumps(leafs, indent=2, sort_keys=True).encode())
        return f"{tenant}-{name}:{leafs[tenant][name]}"

    def remove_leaf(self, tenant: str, name: str) -> None:
        """Refuse a leaf node from the next reload on."""
        leafs = self._leafs()
        if name not in leafs.get(tenant, {}):
            raise ConfigError(f"no leaf {name!r} in tenant {tenant!r}")
        del leafs[tenant][name]
        _write_private(self._leafs_file, json.dumps(leafs, indent=2, sort_keys=True).encode())

    def leaf_users(self) -> list[tuple[str, str, str]]:
        """``(user, password, account)`` of every leaf node allowed to join."""
        return [(f"{tenant}-{name}", password, tenant)
                for tenant, names in sorted(self._leafs().items()) if tenant in self.tenants()
                for name, password in sorted(names.items())]

    def save(self) -> None:
        """Write ``auth.json`` and regenerate ``accounts.conf``."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(self.path / STATE_FILE,
                       (json.dumps(self._state, indent=2, sort_keys=True) + "\n").encode(),
                       mode=0o644)
        _write_private(self.accounts_file, self.accounts_config().encode(), mode=0o644)

    # -- server config --------------------------------------------------------

    def accounts_config(self, *, jetstream: bool = True,
                        extra_users: dict[str, list[dict[str, Any]]] | None = None) -> str:
        """The ``accounts`` block: one account per tenant, users with generated permissions.

        ``jetstream=False`` is for a leaf node without JetStream of its own
        (an edge site: its clients use the hub's). ``extra_users`` adds
        config entries to accounts by tenant name.
        """
        lines = ["# Generated by sessionbus from auth.json: do not edit by hand.",
                 "accounts {"]
        for tenant in self.tenants():
            entries: list[dict[str, Any]] = []
            for user in self.users(tenant):
                perms = role_permissions(user.role, prefixes=user.prefixes or self.prefixes,
                                         domains=self.domains, group=user.group,
                                         partitions=user.partitions)
                entries.append({"nkey": user.nkey, "permissions": perms.to_config()})
            entries += (extra_users or {}).get(tenant, [])
            users = ",\n".join("    " + json.dumps(e) for e in entries)
            js = "    jetstream: enabled\n" if jetstream else ""
            lines.append(f"  {json.dumps(tenant)}: {{\n{js}    users: [\n{users}\n    ]\n  }}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    # -- internals ------------------------------------------------------------

    def _tenant(self, name: str | None) -> str:
        if name is None or name not in self._state["tenants"]:
            raise ConfigError(f"no tenant {name!r} in {self.path}")
        return name

    def _user(self, tenant: str, name: str) -> dict[str, Any]:
        users: dict[str, Any] = self._state["tenants"][self._tenant(tenant)]["users"]
        if name not in users:
            raise ConfigError(f"no user {name!r} in tenant {tenant!r}")
        user: dict[str, Any] = users[name]
        return user


def _check_name(name: str, kind: str) -> None:
    validate_id(name, kind)
    if not name.replace("-", "").replace("_", "").isalnum() or not name.isascii() \
            or name.upper() in ("SYS", "$G", "GLOBAL"):
        raise ConfigError(f"{kind} name {name!r} must be letters, digits, '-' and '_'")
