"""SessionBus: the connection to NATS, the embedded server, and the streams and buckets.

Everything else (registry, sessions, workers) is built on a started bus and
receives it explicitly; there is no global bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from sessionbus.bus._headers import install as install_header_parser
from sessionbus.bus._kv import Bucket, bind_bucket
from sessionbus.bus._loop import check_running_loop
from sessionbus.bus._names import Names, validate_id
from sessionbus.bus._refusals import install as install_refusals
from sessionbus.bus._refusals import refused
from sessionbus.bus._replies import Replies
from sessionbus.bus._server import NatsServer
from sessionbus.bus._wire import install as install_parser
from sessionbus.bus.errors import (
    AuthenticationFailed,
    BusClosedError,
    ConfigError,
    ConnectionFailed,
    PermissionDenied,
    ServerTooOld,
)
from sessionbus.bus.settings import (
    DEFAULT_PARTITIONS,
    DEFAULT_REPLICAS,
    BusSettings,
    env_credentials,
    parse_servers,
    redact_url,
)

if TYPE_CHECKING:
    from sessionbus.bus._closures import ClosedEvent
    from sessionbus.bus._feeds import QueueFeed
    from sessionbus.bus._lifecycle import Lifecycle
    from sessionbus.bus.session import Session
    from sessionbus.schemas import SessionMetadata, SessionState

__all__ = ["MIN_SERVER_VERSION", "SessionBus"]

logger = logging.getLogger(__name__)

#: Per-key TTL and TTL markers arrived in nats-server 2.11.
MIN_SERVER_VERSION = (2, 11)

_PARTITIONS_RE = re.compile(r"partition\((\d+),")
# Temporarily unavailable, not enabled for account (yet), and no peers for a
# replicated stream while a freshly started cluster's nodes become current.
_JS_NOT_READY = (10008, 10039, 10005)
#: What the server says when it refuses a connection's credentials or its TLS.
_AUTH_REFUSALS = ("authorization violation", "authentication", "user revoked",
                  "tls required", "secure connection")
#: The server quotes the subject as Go does: a quote or a backslash in it is escaped.
_DENIED = re.compile(r'permissions violation for (?:publish|subscription) to "((?:[^"\\]|\\.)+)"',
                     re.I)


def _shown(servers: Sequence[str]) -> str:
    """Server URLs for a message: never with the credentials one may carry."""
    return ", ".join(redact_url(s) for s in servers)


def _unquoted(quoted: str) -> str:
    """A subject as the server quoted it in a refusal (backslash escapes undone)."""
    return re.sub(r"\\(.)", r"\1", quoted)


def _refusal(e: BaseException) -> str | None:
    """Why the server refused to let this client in, or None for any other error."""
    if isinstance(e, nats.errors.AuthorizationError):
        return "authorization violation"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {getattr(e, 'reason', None) or e}"
    text = str(e).lower()
    for marker in _AUTH_REFUSALS:
        if marker in text:
            return str(e).removeprefix("nats: ").strip("'")
    return None


async def _stop_reconnecting(nc: Client) -> None:
    """Make sure a closed client's reconnect loop has ended.

    nats-py 2.16 can lose the cancellation of its reconnect task when it
    lands just as a connection attempt to a dead server fails (the attempt
    runs under ``wait_for``); the loop then retries forever and hangs the
    event loop's shutdown. Cancel it again until it ends, a bounded number
    of times.
    """
    task: asyncio.Task[None] | None = getattr(nc, "_reconnection_task", None)
    for _ in range(20):
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    logger.warning("the NATS reconnect loop did not stop")


class SessionBus:
    """A started connection to NATS JetStream and the bus's streams and buckets.

    ``SessionBus()`` with no servers, and no ``SESSIONBUS_URL`` in the
    environment, starts an embedded nats-server (JetStream on, a free
    loopback port, a temporary data directory unless ``data_dir`` is given)
    and stops it on :meth:`close`. Use ``async with SessionBus() as sb:`` or
    ``sb = await SessionBus.connect(...)``.

    ``servers`` is a URL (``nats://h1:4222,h2:4222?replicas=3&prefix=x``)
    or a list of them; the URL's options are read as in
    :meth:`BusSettings.from_url`, and unknown ones are refused. ``options``
    are fields of :class:`BusSettings` (``partitions``, ``replicas``,
    ``domain``, ``user``, ``password``, ``token``, ``creds_file``, ``tls``...),
    applied over the URL's and over ``settings``. ``repr(bus)`` shows the
    settings it runs with (no secrets); after :meth:`start`, ``partitions``
    and ``replicas`` are the envelope stream's actual ones.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        prefix: str | None = None,
        settings: BusSettings | None = None,
        node_id: str | None = None,
        **options: Any,
    ) -> None:
        if prefix is not None:
            options["prefix"] = prefix
        if servers is not None:
            # A URL's own options (?replicas=3&prefix=x) apply; keywords win over
            # them, and credentials from the environment fill in missing ones.
            options = env_credentials({**parse_servers(servers), **options})
        if settings is None:
            settings = (BusSettings.from_env(**options) if servers is None
                        else BusSettings.from_mapping(options))
        elif options:
            try:
                settings = settings.replace(**options)
            except TypeError as e:
                raise ConfigError(str(e)) from e
        self.settings = settings
        install_header_parser()  # same results as nats-py's, several times faster
        self.names = Names(settings.prefix)
        self.node_id = validate_id(node_id, "node id") if node_id else uuid.uuid4().hex[:12]
        self.partitions = settings.partitions or DEFAULT_PARTITIONS
        self.replicas = settings.replicas or DEFAULT_REPLICAS
        #: Seconds envelopes (and terminal session records) are kept: the
        #: envelope stream's ``max_age`` once started, whatever was asked.
        self.envelope_max_age = settings.envelope_max_age
        #: Seconds in which the envelope stream stores a re-sent envelope id
        #: once: its ``duplicate_window`` once started, whatever was asked.
        self.duplicate_window = settings.duplicate_window
        self.embedded: NatsServer | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._replies: Replies | None = None
        self._buckets: dict[str, Bucket] = {}
        self._services: list[Any] = []
        self._lifecycle: Lifecycle | None = None
        self._closed = False
        # Set when the server refuses the credentials, or a JetStream API call
        # while provisioning (with the subject, lowercased by nats-py).
        self._refused: asyncio.Future[str] | None = None
        self._denial: asyncio.Future[str] | None = None

    # -- lifecycle ----------------------------------------------------------

    @classmethod
    async def connect(
        cls, servers: str | Sequence[str] | None = None, **kwargs: Any
    ) -> SessionBus:
        """Create and start a bus in one call."""
        bus = cls(servers, **kwargs)
        await bus.start()
        return bus

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def started(self) -> bool:
        """Whether :meth:`start` completed and :meth:`close` has not been called."""
        return self._nc is not None and not self._closed

    async def start(self) -> None:
        """Connect (starting the embedded server if needed) and provision."""
        if self._nc is not None:
            return
        if self._closed:
            raise BusClosedError("this bus was closed; create a new one")
        check_running_loop(self.settings.event_loop)
        servers = list(self.settings.servers)
        if not servers:
            self.embedded = NatsServer(name="sessionbus", store_dir=self.settings.data_dir)
            await asyncio.to_thread(self.embedded.start)
            servers = [self.embedded.url]
        nc = Client()
        install_parser(nc)
        self._refused = asyncio.get_running_loop().create_future()
        try:
            # nats-py retries the first connect forever when reconnects are
            # unlimited; bound it so a dead server is an error, not a hang,
            # and stop at the first refusal of the credentials.
            await self._first_connect(nc, servers, nc.connect(
                    servers=servers,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    # nats-py annotates this as int but sleeps on it: a quarter
                    # second keeps failover to another cluster node quick.
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                    **self.settings.connect_options(),
                ))
        except ImportError as e:
            await self._stop_embedded()
            raise ConfigError(
                f"NKey and .creds authentication need the nkeys package ({e})"
            ) from None
        except ConnectionFailed:
            with contextlib.suppress(Exception):
                await nc.close()
            await _stop_reconnecting(nc)
            await self._stop_embedded()
            raise
        except (TimeoutError, OSError, nats.errors.Error) as e:
            with contextlib.suppress(Exception):
                await nc.close()
            await self._stop_embedded()
            raise ConnectionFailed(
                f"cannot connect to NATS at {_shown(servers)}: {e or type(e).__name__}"
            ) from e
        self._nc = nc
        install_refusals(nc)
        try:
            self._check_version()
            self._js = self._nc.jetstream(
                domain=self.settings.domain, timeout=self.settings.request_timeout
            )
            self._replies = Replies(nc)
            await self._provision()
            await self._start_lifecycle()
        except BaseException:
            await self._abort()
            raise

    async def _first_connect(self, nc: Client, servers: list[str], connecting: Any) -> None:
        """Await ``connecting``; raise AuthenticationFailed as soon as a server refuses us."""
        assert self._refused is not None
        task = asyncio.ensure_future(connecting)
        done, _ = await asyncio.wait({task, self._refused},
                                     timeout=self.settings.connect_timeout * 2,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self._refused in done:
            raise AuthenticationFailed(
                f"NATS at {_shown(servers)} refused the connection: {self._refused.result()}"
            )
        raise TimeoutError

    async def close(self) -> None:
        """Stop services started on this bus, drain the connection, stop the embedded server."""
        if self._closed:
            return
        self._closed = True
        for service in reversed(self._services):
            try:
                await service.stop()
            except Exception:
                logger.exception("error stopping %r", service)
        self._services.clear()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                if nc.is_reconnecting:  # nothing to drain into a lost server
                    raise nats.errors.ConnectionReconnectingError
                await asyncio.wait_for(nc.drain(), timeout=5.0)
            except (TimeoutError, nats.errors.Error, OSError):
                # A lost server makes close() fail flushing too; the socket is gone anyway.
                with contextlib.suppress(nats.errors.Error, OSError):
                    await nc.close()
            await _stop_reconnecting(nc)
        await self._stop_embedded()

    async def _abort(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()
        await self._stop_embedded()

    async def _stop_embedded(self) -> None:
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None

    def add_service(self, service: Any) -> None:
        """Have :meth:`close` call ``await service.stop()`` (in reverse order of adding)."""
        self._services.append(service)

    # -- accessors ----------------------------------------------------------

    @property
    def nc(self) -> Client:
        """The nats-py client."""
        if self._nc is None or self._closed:
            raise BusClosedError("the bus is not started (use 'async with SessionBus()')")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (in the configured domain)."""
        if self._js is None or self._closed:
            raise BusClosedError("the bus is not started (use 'async with SessionBus()')")
        return self._js

    @property
    def replies(self) -> Replies:
        """Writes into the envelope stream, their acknowledgements on one inbox."""
        if self._replies is None or self._closed:
            raise BusClosedError("the bus is not started (use 'async with SessionBus()')")
        return self._replies

    @property
    def url(self) -> str:
        """URL of the server this bus is connected to."""
        nc = self.nc
        srv = nc.connected_url
        return f"nats://{srv.hostname}:{srv.port}" if srv else ""

    @property
    def api_prefix(self) -> str:
        """JetStream API subject prefix (domain-aware), for raw API calls."""
        domain = self.settings.domain
        return f"$JS.{domain}.API" if domain else "$JS.API"

    def bucket(self, name: str) -> Bucket:
        """A provisioned bucket by its full name (see :class:`Names`)."""
        try:
            return self._buckets[name]
        except KeyError:
            raise BusClosedError(f"bucket {name!r} is not provisioned on this bus") from None

    @property
    def sessions_kv(self) -> Bucket:
        """Session lifecycle records and idle timers."""
        return self.bucket(self.names.sessions_bucket)

    @property
    def registry_kv(self) -> Bucket:
        """Node registry records."""
        return self.bucket(self.names.registry_bucket)

    @property
    def workers_kv(self) -> Bucket:
        """Worker leases."""
        return self.bucket(self.names.workers_bucket)

    @property
    def locks_kv(self) -> Bucket:
        """Turn-lock leases."""
        return self.bucket(self.names.locks_bucket)

    # -- sessions -----------------------------------------------------------

    async def open(
        self,
        session_id: str | None = None,
        *,
        participants: Sequence[str] | None = None,
        ttl: float | None = None,
        metadata: dict[str, Any] | None = None,
        max_depth: int | None = None,
        participant: str = "",
    ) -> Session:
        """Open a new ACTIVE session and return its handle (see :class:`sessionbus.bus.Session`).

        ``session_id`` None makes one up; a taken id raises SessionExists.
        ``ttl`` is the idle timeout in seconds (None: ``settings.session_ttl``);
        ``max_depth`` bounds delegation (None: ``settings.max_depth``);
        ``participant`` is who the returned handle sends as.
        """
        from sessionbus.bus.session import open_session

        return await open_session(
            self, session_id, participants=participants, ttl=ttl, metadata=metadata,
            max_depth=max_depth, participant=participant,
        )

    def session(self, session_id: str, *, participant: str = "") -> Session:
        """A handle on an existing session, without any I/O (call ``info()`` to load it)."""
        from sessionbus.bus.session import Session

        return Session.attach(self, session_id, participant=participant)

    async def list_sessions(self, *, state: SessionState | None = None) -> list[SessionMetadata]:
        """Every session's record, oldest first; only those in ``state`` if it is given.

        Records that do not decode are skipped (and logged), so one bad
        record does not hide the others. Closed and expired records are
        listed until their TTL (:attr:`envelope_max_age`) removes them.
        """
        return await self.lifecycle.list_sessions(state=state)

    @property
    def lifecycle(self) -> Lifecycle:
        """Session records, timers and tasks; ``lifecycle.states`` holds what this process knows."""
        if self._lifecycle is None or self._closed:
            raise BusClosedError("the bus is not started (use 'async with SessionBus()')")
        return self._lifecycle

    async def start_lifecycle(self) -> None:
        """Run the session expiry watcher on this bus until it closes (idempotent).

        Opening a session with a TTL starts it too. Workers run it, so that
        sessions expire while any worker is up.
        """
        await self.lifecycle.start_expiry_watcher()

    def closed_events(self) -> QueueFeed[ClosedEvent]:
        """A feed of the session closes and expiries this bus hears (``async with`` it)."""
        return self.lifecycle.states.closed_feed()

    # -- internals ----------------------------------------------------------

    async def _start_lifecycle(self) -> None:
        from sessionbus.bus._lifecycle import Lifecycle

        self._lifecycle = Lifecycle(self)
        await self._lifecycle.start()
        # Added first, so stopped last: services built on sessions stop before it.
        self.add_service(self._lifecycle)

    def _check_version(self) -> None:
        version = self.nc.connected_server_version
        if (version.major, version.minor) < MIN_SERVER_VERSION:
            raise ServerTooOld(
                f"{version.major}.{version.minor}.{version.patch}",
                ".".join(map(str, MIN_SERVER_VERSION)),
            )

    async def _provision(self) -> None:
        """Create or bind the streams and buckets, retrying while JetStream warms up."""
        deadline = asyncio.get_running_loop().time() + max(10.0, self.settings.connect_timeout)
        delay = 0.05
        while True:
            try:
                await self._denial_or(self._provision_once())
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as e:
                err: BaseException = e
            except nats.js.errors.APIError as e:
                if e.err_code not in _JS_NOT_READY and e.code != 503:
                    raise ConnectionFailed(f"cannot provision JetStream: {e}") from e
                err = e
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionFailed(f"JetStream not available: {err}") from err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _denial_or(self, work: Any) -> None:
        """Run ``work``; a permission refusal of the API while it runs ends it at once.

        A refused request gets no answer, only an error on the connection:
        without this, provisioning as a non-admin user would wait out its
        request timeout before saying why.
        """
        loop = asyncio.get_running_loop()
        self._denial = loop.create_future()
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, self._denial}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.done() and not task.cancelled() and (
                task.exception() is None or not self._denial.done()):
            task.result()
            return
        raise PermissionDenied(
            self._denial.result(), "provisioning streams and buckets (an admin user creates "
            "them once; other roles only bind to them)"
        )

    async def _provision_once(self) -> None:
        n = self.names
        await self._ensure_envelope_stream()
        await self._ensure_stream(api.StreamConfig(
            name=n.dead_letter_stream, subjects=[n.dead_letter_all],
            retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE,
            max_age=14 * 24 * 3600.0, num_replicas=self.replicas, allow_direct=True,
        ))
        for name in (n.sessions_bucket, n.registry_bucket, n.workers_bucket, n.locks_bucket):
            await self._ensure_bucket(name)

    async def _ensure_envelope_stream(self) -> None:
        s, n = self.settings, self.names
        config = api.StreamConfig(
            name=n.envelope_stream,
            description=f"sessionbus envelopes, {self.partitions} partitions",
            subjects=[n.inbound_all],
            subject_transform=api.SubjectTransform(
                src=n.inbound_all, dest=n.partition_transform(self.partitions)
            ),
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_msgs_per_subject=s.max_envelopes_per_session,
            max_age=s.envelope_max_age,
            max_msg_size=s.max_envelope_bytes + 4096,
            duplicate_window=s.duplicate_window,
            num_replicas=self.replicas,
            allow_direct=True,
            allow_msg_ttl=True,
            max_consumers=self.partitions * 16 + 4096,
        )
        info = await self._ensure_stream(config)
        transform = info.config.subject_transform
        match = _PARTITIONS_RE.search(transform.dest or "") if transform else None
        if match is None:
            raise ConfigError(
                f"stream {n.envelope_stream} exists without a partition transform; "
                "it was not created by sessionbus"
            )
        # An existing stream keeps the partition count it was created with;
        # asking for another one explicitly is an error, not a silent change.
        found = int(match.group(1))
        if s.partitions is not None and s.partitions != found:
            raise ConfigError(
                f"stream {n.envelope_stream} exists with {found} partitions, "
                f"not the {s.partitions} asked for (partitions are fixed at creation: "
                "drop the option to use it as it is, or use another prefix)"
            )
        self.partitions = found
        self.replicas = info.config.num_replicas or DEFAULT_REPLICAS
        # Every bus must agree on how long a terminal record lives: whoever
        # reopens an id after it expired sends no hint (see _states), so the
        # stream's retention, not each process's setting, is the one used.
        kept = info.config.max_age or s.envelope_max_age
        if abs(kept - s.envelope_max_age) >= 1.0:
            logger.warning("stream %s keeps envelopes %.0f s, not the %.0f s asked for: "
                           "using %.0f s", n.envelope_stream, kept, s.envelope_max_age, kept)
        self.envelope_max_age = kept
        self.duplicate_window = info.config.duplicate_window or s.duplicate_window

    async def _ensure_stream(self, config: api.StreamConfig) -> api.StreamInfo:
        assert config.name is not None
        try:
            return self._checked(await self.js.stream_info(config.name))
        except nats.js.errors.NotFoundError:
            pass
        try:
            return await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as e:
            if e.err_code == 10058:  # created concurrently by another node
                return self._checked(await self.js.stream_info(config.name))
            raise

    def _checked(self, info: api.StreamInfo) -> api.StreamInfo:
        """An existing stream, unless it has other replicas than explicitly asked for."""
        asked, found = self.settings.replicas, info.config.num_replicas or 1
        if asked is not None and asked != found:
            raise ConfigError(
                f"stream {info.config.name} exists with {found} replica(s), not the "
                f"{asked} asked for (change it with 'nats stream edit', or drop the option)"
            )
        return info

    async def _ensure_bucket(self, name: str) -> None:
        self._buckets[name] = await bind_bucket(
            self.nc, self.js, name, replicas=self.replicas, domain=self.settings.domain,
            request_timeout=self.settings.request_timeout, check=self._checked,
        )

    async def _on_error(self, e: Exception) -> None:
        if self._nc is None:  # first-connect failures are reported by start()
            reason = _refusal(e)
            if reason is not None and self._refused is not None and not self._refused.done():
                self._refused.set_result(reason)
            return
        denied = _DENIED.search(str(e))
        subject = _unquoted(denied.group(1)) if denied else ""
        if denied and self._denial is not None and not self._denial.done():
            if subject.startswith(self.api_prefix.lower() + "."):
                self._denial.set_result(subject)
        logger.warning("NATS error: %s", e)
        if denied and denied.group(0).lower().startswith("permissions violation for publish"):
            refused(self._nc, subject)  # its requests fail now (bus/_refusals.py)

    async def _on_disconnect(self) -> None:
        if not self._closed:
            logger.warning("disconnected from NATS")
        if self._lifecycle is not None:
            self._lifecycle.states.stale()  # hints may be missed from now on

    async def _on_reconnect(self) -> None:
        if self._lifecycle is not None:
            self._lifecycle.states.stale()
        logger.info("reconnected to NATS at %s", self._nc.connected_url if self._nc else "?")

    def __repr__(self) -> str:
        state = "started" if self.started else "closed" if self._closed else "new"
        s = self.settings
        where = ("embedded " + (self.embedded.url if self.embedded else "server")
                 if s.embedded else ",".join(s.describe()["servers"]))
        domain = f" domain={s.domain!r}" if s.domain else ""
        return (f"<SessionBus {state} {where} prefix={s.prefix!r}{domain} "
                f"partitions={self.partitions} replicas={self.replicas} node={self.node_id}>")
