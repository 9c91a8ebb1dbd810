"""Connection and bus settings: one frozen object, buildable from a URL."""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from sessionbus.bus._names import validate_prefix
from sessionbus.bus.errors import ConfigError

#: Environment variable holding the server URL; unset means the embedded server.
URL_ENV = "SESSIONBUS_URL"

_INT_FIELDS = ("partitions", "replicas", "max_envelope_bytes", "max_envelopes_per_session",
               "max_depth")
_FLOAT_FIELDS = ("duplicate_window", "envelope_max_age", "session_ttl", "connect_timeout",
                 "request_timeout", "lock_lease", "lock_refresh")


@dataclass(frozen=True, kw_only=True)
class BusSettings:
    """Everything a :class:`~sessionbus.bus.SessionBus` needs to know, validated on creation.

    ``servers`` empty means: start the embedded nats-server. Stream and
    bucket settings (``partitions``, ``replicas``, limits) apply when the bus
    creates them; an existing stream keeps its recorded partition count.
    """

    servers: tuple[str, ...] = ()
    prefix: str = "sb"
    #: JetStream domain to reach (e.g. ``"hub"`` from a leaf node).
    domain: str | None = None
    #: Partitions of the envelope stream, fixed when the stream is created.
    partitions: int = 64
    #: Replicas of the stream and buckets (3 on a 3-node cluster).
    replicas: int = 1
    #: Largest encoded envelope accepted, checked before publishing.
    max_envelope_bytes: int = 256 * 1024
    #: Envelopes kept per session; older ones are dropped from history first.
    max_envelopes_per_session: int = 10_000
    #: How long envelopes are kept at most, in seconds.
    envelope_max_age: float = 7 * 24 * 3600.0
    #: Window in which a re-sent envelope id is recognised and stored once.
    duplicate_window: float = 120.0
    #: Default idle TTL of a session opened without one; None keeps it open.
    session_ttl: float | None = 3600.0
    #: Default delegation depth limit of a new session.
    max_depth: int = 8
    #: Seconds a turn lock outlives its holder's last refresh (a crashed
    #: holder frees the lock after about this long).
    lock_lease: float = 10.0
    #: Seconds between refreshes of a held turn lock; None is a third of the lease.
    lock_refresh: float | None = None
    #: Embedded server only: keep its data here instead of a temporary directory.
    data_dir: str | None = None
    name: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 5.0

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        if isinstance(self.servers, str):
            object.__setattr__(self, "servers", tuple(s for s in self.servers.split(",") if s))
        if not 1 <= self.partitions <= 4096:
            raise ConfigError(f"partitions must be in 1..4096, got {self.partitions}")
        if self.replicas not in (1, 3, 5):
            raise ConfigError(f"replicas must be 1, 3 or 5, got {self.replicas}")
        if self.max_envelope_bytes < 1024:
            raise ConfigError(f"max_envelope_bytes must be >= 1024, got {self.max_envelope_bytes}")
        if self.max_envelopes_per_session < 1:
            raise ConfigError("max_envelopes_per_session must be >= 1")
        if self.max_depth < 0:
            raise ConfigError(f"max_depth must be >= 0, got {self.max_depth}")
        for name in ("duplicate_window", "envelope_max_age", "connect_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        check_ttl(self.session_ttl, "session_ttl", optional=True)
        check_lock_timing(self.lock_lease, self.lock_refresh)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BusSettings:
        """Parse ``nats://[user:pass@]host:port[,host:port][?option=value&...]``.

        Query options name fields of this class (``prefix``, ``partitions``,
        ``replicas``, ``domain``, ``token``, ``creds_file``, ...); ``overrides``
        win over the URL.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
        netloc = parts.netloc
        options: dict[str, Any] = {}
        if "@" in netloc:
            auth, netloc = netloc.rsplit("@", 1)
            if ":" in auth:
                user, password = auth.split(":", 1)
                options["user"], options["password"] = unquote(user), unquote(password)
            else:
                options["token"] = unquote(auth)
        if not netloc:
            raise ConfigError(f"no host in {url!r}")
        options["servers"] = tuple(f"{parts.scheme}://{h}" for h in netloc.split(",") if h)
        for key, value in parse_qsl(parts.query):
            options[key] = value
        options.update(overrides)
        return cls.from_mapping(options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BusSettings:
        """Settings from ``SESSIONBUS_URL`` if set, else the embedded server's."""
        env = os.environ if environ is None else environ
        url = env.get(URL_ENV, "").strip()
        if url:
            return cls.from_url(url, **overrides)
        return cls.from_mapping(overrides)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> BusSettings:
        """Build from loosely typed options (strings from a URL or a CLI)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, value in options.items():
            if isinstance(value, str):
                if key in _INT_FIELDS:
                    value = _parse(int, key, value)
                elif key in _FLOAT_FIELDS:
                    value = None if value.lower() in ("", "none") else _parse(float, key, value)
                elif key == "servers":
                    value = tuple(s for s in value.split(",") if s)
            elif key == "servers" and isinstance(value, Sequence):
                value = tuple(value)
            values[key] = value
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(str(e)) from e

    def replace(self, **changes: Any) -> BusSettings:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    @property
    def embedded(self) -> bool:
        """Whether the bus starts its own server."""
        return not self.servers

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``: authentication passes through."""
        opts: dict[str, Any] = {"connect_timeout": self.connect_timeout}
        if self.name:
            opts["name"] = self.name
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token is not None:
            opts["token"] = self.token
        if self.creds_file is not None:
            opts["user_credentials"] = self.creds_file
        tls = self.tls
        if tls is None and (self.tls_ca_file or self.tls_cert_file):
            tls = ssl.create_default_context(cafile=self.tls_ca_file)
            if self.tls_cert_file:
                tls.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        if tls is not None:
            opts["tls"] = tls
        return opts


def check_ttl(ttl: object, name: str = "ttl", *, optional: bool = False) -> float | None:
    """Validate a TTL in seconds: a finite number > 0 (or None when optional)."""
    if ttl is None and optional:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ConfigError(f"{name} must be a number of seconds, got {ttl!r}")
    if not (ttl > 0 and ttl < float("inf")):
        raise ConfigError(f"{name} must be > 0 and finite, got {ttl!r}")
    return float(ttl)


def check_lock_timing(lease: object, refresh: object = None) -> tuple[float, float]:
    """Validate a turn lock's lease and refresh interval; return them (refresh defaulted).

    The refresh must come well inside the lease, or one slow round trip
    loses the lock.
    """
    lease_s = check_ttl(lease, "lock_lease")
    assert lease_s is not None
    if refresh is None:
        return lease_s, lease_s / 3
    refresh_s = check_ttl(refresh, "lock_refresh")
    assert refresh_s is not None
    if refresh_s > lease_s / 2:
        raise ConfigError(
            f"lock_refresh must be at most half of lock_lease ({lease_s}), got {refresh_s}"
        )
    return lease_s, refresh_s


def _parse(kind: type[Any], key: str, value: str) -> Any:
    try:
        return kind(value)
    except ValueError as e:
        raise ConfigError(f"setting {key}={value!r} is not a valid {kind.__name__}") from e
