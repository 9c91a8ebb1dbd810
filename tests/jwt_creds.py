"""A minimal NATS operator/account/user JWT issuer, for testing ``.creds`` files.

Just enough of the JWT v2 claims for nats-server's memory resolver: an
operator signs one account (with JetStream), the account signs users whose
permissions are the ones ``bus/_permissions.py`` generates.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import nkeys
from sessionbus.bus._permissions import Permissions


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Key:
    """An NKey pair of one kind (operator, account or user)."""

    seed: bytes

    @classmethod
    def new(cls, prefix: int) -> Key:
        return cls(nkeys.encode_seed(secrets.token_bytes(32), prefix))

    @property
    def public(self) -> str:
        key: bytes = nkeys.from_seed(bytearray(self.seed)).public_key
        return key.decode("ascii")

    def sign(self, data: bytes) -> bytes:
        signed: bytes = nkeys.from_seed(bytearray(self.seed)).sign(data)
        return signed


def encode_jwt(issuer: Key, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A signed JWT: ``issuer`` vouches for ``subject``."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name,
                              "sub": subject, "nats": {**nats, "version": 2}}
    claims["jti"] = base64.b32encode(
        hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    ).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(issuer.sign(f'{head}.{body}'.encode()))}"


@dataclass
class Operator:
    """An operator with one JetStream-enabled account."""

    operator: Key
    account: Key
    system: Key

    @classmethod
    def new(cls) -> Operator:
        return cls(Key.new(nkeys.PREFIX_BYTE_OPERATOR), Key.new(nkeys.PREFIX_BYTE_ACCOUNT),
                   Key.new(nkeys.PREFIX_BYTE_ACCOUNT))

    def server_config(self) -> str:
        """The operator, resolver and preloaded accounts for a nats-server config."""
        op = encode_jwt(self.operator, self.operator.public, "op",
                        {"type": "operator", "system_account": self.system.public})
        sys_acc = encode_jwt(self.operator, self.system.public, "SYS", {"type": "account"})
        limits = {"subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1,
                  "data": -1, "payload": -1, "wildcards": True, "mem_storage": -1,
                  "disk_storage": -1, "streams": -1, "consumer": -1}
        acc = encode_jwt(self.operator, self.account.public, "acme",
                         {"type": "account", "limits": limits})
        return (f"operator: {json.dumps(op)}\nsystem_account: {self.system.public}\n"
                "resolver: MEMORY\n"
                f"resolver_preload: {{ {self.account.public}: {json.dumps(acc)}, "
                f"{self.system.public}: {json.dumps(sys_acc)} }}\n")

    def creds(self, name: str, permissions: Permissions) -> str:
        """A ``.creds`` file's text for a new user with ``permissions``."""
        user = Key.new(nkeys.PREFIX_BYTE_USER)
        jwt = encode_jwt(self.account, user.public, name, {
            "type": "user", "subs": -1, "data": -1, "payload": -1,
            "pub": {"allow": list(permissions.publish)},
            "sub": {"allow": list(permissions.subscribe)},
            **({"resp": {"max": 1, "ttl": 0}} if permissions.allow_responses else {}),
        })
        return ("-----BEGIN NATS USER JWT-----\n" + jwt + "\n------END NATS USER JWT------\n\n"
                "-----BEGIN USER NKEY SEED-----\n" + user.seed.decode() +
                "\n------END USER NKEY SEED------\n")
