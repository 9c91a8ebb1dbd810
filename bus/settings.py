"""Connection and bus settings: one frozen object, buildable from a URL."""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from sessionbus.bus._loop import check_choice as check_loop_choice
from sessionbus.bus._names import validate_prefix
from sessionbus.bus.errors import ConfigError

#: Environment variable holding the server URL; unset means the embedded server.
URL_ENV = "SESSIONBUS_URL"

#: Credentials and TLS files read from the environment (``SESSIONBUS_<FIELD>``),
#: used with any server URL that carries no credentials of its own.
CREDENTIAL_FIELDS = ("user", "password", "token", "creds_file", "nkey_seed_file",
                     "tls_ca_file", "tls_cert_file", "tls_key_file")
_AUTH_FIELDS = ("user", "password", "token", "creds_file", "nkey_seed_file")


def env_credentials(
    options: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``options`` with credentials and TLS files from the environment filled in.

    ``SESSIONBUS_USER``/``SESSIONBUS_PASSWORD``, ``SESSIONBUS_TOKEN``,
    ``SESSIONBUS_CREDS_FILE``, ``SESSIONBUS_NKEY_SEED_FILE`` apply only when
    ``options`` (a URL's, a caller's) name no credentials themselves; the
    ``SESSIONBUS_TLS_*_FILE`` ones fill in each TLS file not given.
    """
    env = os.environ if environ is None else environ
    found = {f: env[f"SESSIONBUS_{f.upper()}"] for f in CREDENTIAL_FIELDS
             if env.get(f"SESSIONBUS_{f.upper()}")}
    if any(options.get(f) is not None for f in _AUTH_FIELDS):
        found = {f: v for f, v in found.items() if f not in _AUTH_FIELDS}
    return {**found, **{k: v for k, v in options.items() if v is not None or k not in found}}

#: Partitions of a new envelope stream when none are asked for.
DEFAULT_PARTITIONS = 64
#: Replicas of new streams and buckets when none are asked for.
DEFAULT_REPLICAS = 1


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("", "none") else float(text)


@dataclass(frozen=True)
class UrlOption:
    """How one URL query option is read: the settings field it sets and its parser."""

    field: str
    parse: Callable[[str], Any] = str
    #: Hidden in ``repr`` and :meth:`BusSettings.describe`.
    secret: bool = False


def _table(*options: UrlOption, **aliases: str) -> dict[str, UrlOption]:
    table = {o.field: o for o in options}
    for alias, name in aliases.items():
        table[alias] = table[name]
    return table


#: Every option a URL (``?name=value&...``) may carry, by its name in the URL.
#: This is the one place to add an option: the constructor, ``connect()``,
#: ``SESSIONBUS_URL`` and the CLI's ``--url`` all read URLs through it, and
#: refuse any name not listed here.
URL_OPTIONS: dict[str, UrlOption] = _table(
    UrlOption("prefix"),
    UrlOption("domain"),
    UrlOption("name"),
    UrlOption("partitions", int),
    UrlOption("replicas", int),
    UrlOption("max_envelope_bytes", int),
    UrlOption("max_envelopes_per_session", int),
    UrlOption("max_depth", int),
    UrlOption("envelope_max_age", float),
    UrlOption("duplicate_window", float),
    UrlOption("session_ttl", _optional_float),
    UrlOption("lock_lease", float),
    UrlOption("lock_refresh", _optional_float),
    UrlOption("connect_timeout", float),
    UrlOption("request_timeout", float),
    UrlOption("data_dir"),
    UrlOption("user"),
    UrlOption("password", secret=True),
    UrlOption("token", secret=True),
    UrlOption("creds_file"),
    UrlOption("nkey_seed_file"),
    UrlOption("tls_ca_file"),
    UrlOption("tls_cert_file"),
    UrlOption("tls_key_file"),
)

_SECRET_FIELDS = frozenset(o.field for o in URL_OPTIONS.values() if o.secret)


def parse_url(url: str) -> dict[str, Any]:
    """The settings a URL names, typed: ``servers`` plus its credentials and query options.

    ``nats://[user:pass@|token@]host:port[,[nats://]host:port...][?option=value&...]``;
    a server without a scheme takes the one before it (``nats://`` first).
    Unknown or repeated options, and values that do not parse, raise
    :class:`ConfigError` (naming the option, never echoing a secret).
    """
    base, _, query = url.strip().partition("?")
    if "#" in url:
        raise ConfigError("a server URL takes no #fragment")
    options: dict[str, Any] = {}
    servers: list[str] = []
    scheme = "nats"
    for piece in base.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "://" in piece:
            scheme, piece = piece.split("://", 1)
        if scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigError(f"unsupported URL scheme {scheme!r} (use nats, tls, ws or wss)")
        if "@" in piece:
            auth, piece = piece.rsplit("@", 1)
            user, colon, password = auth.partition(":")
            found = ({"user": unquote(user), "password": unquote(password)} if colon
                     else {"token": unquote(auth)})
            for key, value in found.items():
                if options.setdefault(key, value) != value:
                    raise ConfigError(f"server URLs disagree on their {key}")
        piece = piece.rstrip("/")
        if not piece or "/" in piece:
            raise ConfigError(f"no host in server URL {redact_url(url)!r}")
        servers.append(f"{scheme}://{piece}")
    if not servers:
        raise ConfigError(f"no host in server URL {redact_url(url)!r}")
    options["servers"] = tuple(servers)
    seen: set[str] = set()
    for key, text in parse_qsl(query, keep_blank_values=True):
        option = URL_OPTIONS.get(key)
        if option is None:
            raise ConfigError(
                f"unknown URL option {key!r}; known: {', '.join(sorted(URL_OPTIONS))}"
            )
        if option.field in seen or option.field in options:
            raise ConfigError(f"URL option {key!r} given twice")
        seen.add(option.field)
        options[option.field] = _parse(option, key, text)
    return options


def parse_servers(servers: str | Sequence[str]) -> dict[str, Any]:
    """:func:`parse_url` over one URL or several; their options must agree."""
    urls = [servers] if isinstance(servers, str) else list(servers)
    merged: dict[str, Any] = {"servers": ()}
    for url in urls:
        if not isinstance(url, str):
            raise ConfigError(f"a server URL must be a string, got {type(url).__name__}")
        for key, value in parse_url(url).items():
            if key == "servers":
                merged["servers"] += value
            elif merged.setdefault(key, value) != value:
                raise ConfigError(f"server URLs disagree on option {key!r}")
    if not merged["servers"]:
        raise ConfigError("no server URL given")
    return merged


def redact_url(url: str) -> str:
    """``url`` without its credentials, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if "@" in rest else url


@dataclass(frozen=True, kw_only=True)
class BusSettings:
    """Everything a :class:`~sessionbus.bus.SessionBus` needs to know, validated on creation.

    ``servers`` empty means: start the embedded nats-server. Stream and
    bucket settings (``partitions``, ``replicas``, limits) apply when the bus
    creates them. ``partitions`` and ``replicas`` left as None take what an
    existing stream has (or 64 and 1 when the bus creates it); when given,
    a stream or bucket that already exists with other values is refused
    with :class:`ConfigError` instead of being used silently.

    ``repr()`` and :meth:`describe` show the settings without secrets.
    """

    servers: tuple[str, ...] = ()
    prefix: str = "sb"
    #: JetStream domain to reach (e.g. ``"hub"`` from a leaf node).
    domain: str | None = None
    #: Partitions of the envelope stream, fixed when the stream is created
    #: (None: the existing stream's, or 64 for a new one).
    partitions: int | None = None
    #: Replicas of the stream and buckets, e.g. 3 on a 3-node cluster
    #: (None: whatever exists, or 1 for new ones).
    replicas: int | None = None
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
    nkey_seed_file: str | None = None
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 5.0
    #: Event loop: ``auto`` (uvloop when installed), ``uvloop`` (required:
    #: a bus on another loop refuses to start) or ``asyncio``. The CLI
    #: starts its loop with it; a program picks its own loop at start.
    event_loop: str = "auto"

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        check_loop_choice(self.event_loop)
        servers: Any = self.servers
        if isinstance(servers, str):
            servers = servers.split(",")
        servers = tuple(str(s).strip() for s in servers if str(s).strip())
        for server in servers:
            if "?" in server:
                raise ConfigError(
                    "URL options belong in BusSettings.from_url() or SessionBus(url), "
                    "not in BusSettings(servers=...)"
                )
        object.__setattr__(self, "servers", servers)
        if self.partitions is not None and not 1 <= self.partitions <= 4096:
            raise ConfigError(f"partitions must be in 1..4096, got {self.partitions}")
        if self.replicas is not None and self.replicas not in (1, 3, 5):
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
    def from_url(cls, url: str | Sequence[str], **overrides: Any) -> BusSettings:
        """Parse ``nats://[user:pass@]host:port[,host:port][?option=value&...]``.

        Query options are the names in :data:`URL_OPTIONS` (``prefix``,
        ``partitions``, ``replicas``, ``domain``, ``token``, ``creds_file``,
        ...); an unknown one raises :class:`ConfigError`. Every server of a
        comma list is kept. ``overrides`` (typed values) win over the URL.
        """
        return cls.from_mapping({**parse_servers(url), **overrides})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, url: str | None = None,
                 **overrides: Any) -> BusSettings:
        """Settings from ``url`` or ``SESSIONBUS_URL``, else the embedded server's.

        With a URL, credentials and TLS files missing from it (and from
        ``overrides``) come from the environment: see :func:`env_credentials`.
        """
        env = os.environ if environ is None else environ
        url = url or env.get(URL_ENV, "").strip()
        if url:
            return cls.from_mapping(env_credentials({**parse_servers(url), **overrides}, env))
        return cls.from_mapping(overrides)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> BusSettings:
        """Build from field names and values; text values are parsed as in a URL."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, value in options.items():
            option = URL_OPTIONS.get(key)
            if isinstance(value, str) and option is not None:
                value = _parse(option, key, value)
            values[key] = value
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(str(e)) from e

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, secrets replaced by ``"***"`` (for logs and ``info``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value is not None:
                value = "***"
            elif f.name == "servers":
                value = [redact_url(s) for s in value]
            elif f.name == "tls":
                value = None if value is None else "SSLContext"
            out[f.name] = value
        return out

    def __repr__(self) -> str:
        # Only what differs from the defaults, and never a secret.
        described = self.describe()
        shown = []
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.name == "servers" or getattr(self, f.name) != default:
                shown.append(f"{f.name}={described[f.name]!r}")
        return f"BusSettings({', '.join(shown)})"

    def replace(self, **changes: Any) -> BusSettings:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    @property
    def embedded(self) -> bool:
        """Whether the bus starts its own server."""
        return not self.servers

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``: authentication passes through.

        Files named by the settings must be readable, else :class:`ConfigError`
        (before any connection is tried).
        """
        for name in ("creds_file", "nkey_seed_file", "tls_ca_file", "tls_cert_file",
                     "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"{name} {path!r} is not a readable file")
        if self.tls_key_file and not self.tls_cert_file:
            raise ConfigError("tls_key_file needs tls_cert_file")
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
        if self.nkey_seed_file is not None:
            opts["nkeys_seed"] = self.nkey_seed_file
        tls = self.tls
        if tls is None and (self.tls_ca_file or self.tls_cert_file):
            tls = ssl.create_default_context(cafile=self.tls_ca_file)
            if self.tls_cert_file:
                tls.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        if tls is not None:
            opts["tls"] = tls
        return opts


def check_int(value: object, name: str, *, least: int) -> int:
    """Validate an integer setting or argument of at least ``least`` (a bool is no integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


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


def _parse(option: UrlOption, key: str, text: str) -> Any:
    try:
        return option.parse(text)
    except ValueError as e:
        shown = "***" if option.secret else repr(text)
        raise ConfigError(f"setting {key}={shown} is not valid: {e}") from e
