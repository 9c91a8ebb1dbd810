"""Every subject, stream, bucket and key name sessionbus uses, built in one place.

Ids from outside (a call id, an MCP session id) may hold any character. A
NATS subject token may not hold ``.``, ``*``, ``>`` or whitespace, and a KV
key only ``[-/_=.A-Za-z0-9]``. :func:`encode_token` maps any id to a token
that is safe in both, reversibly: ids made only of ``[A-Za-z0-9_-]`` stay as
they are (so subjects stay readable), anything else becomes ``=`` followed by
the unpadded base64url of its UTF-8 bytes. ``=`` never starts a plain token,
so the two forms cannot collide.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from sessionbus.bus.errors import InvalidIdError

#: Longest id accepted, in UTF-8 bytes. Encoded, two of these still fit in
#: nats-server's default 4 KiB control line together with the prefix.
MAX_ID_BYTES = 1024

#: Header carrying an envelope's delegation depth beside its body, so a
#: headers-only scan of a session's history can find a causation's depth.
DEPTH_HEADER = "Sb-Depth"
#: JetStream's de-duplication header; sessionbus sets it to the envelope id.
MSG_ID_HEADER = "Nats-Msg-Id"
#: Per-message TTL header (whole seconds) of streams that allow it.
TTL_HEADER = "Nats-TTL"

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_ENCODED_MARK = "="


def validate_id(value: object, kind: str = "session id") -> str:
    """Return ``value`` if it can be used as an id, else raise :class:`InvalidIdError`."""
    if not isinstance(value, str):
        raise InvalidIdError(kind, value, f"must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidIdError(kind, value, "must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidIdError(kind, value, "is not valid unicode (lone surrogate)") from e
    if size > MAX_ID_BYTES:
        raise InvalidIdError(kind, value, f"is {size} bytes in UTF-8, limit is {MAX_ID_BYTES}")
    return value


def encode_token(value: str, kind: str = "session id") -> str:
    """Map an id to a single subject token that is also a valid KV key part."""
    validate_id(value, kind)
    if _PLAIN.fullmatch(value):
        return value
    raw = base64.urlsafe_b64encode(value.encode("utf-8")).rstrip(b"=")
    return _ENCODED_MARK + raw.decode("ascii")


def decode_token(token: str, kind: str = "session id") -> str:
    """Invert :func:`encode_token`, refusing every token it would not have produced.

    Each id has exactly one token: a plain id is never accepted in encoded
    form, padding and non-zero trailing bits are refused, and the decoded id
    must itself be valid. So two subjects can never name the same session.
    """
    if not token.startswith(_ENCODED_MARK):
        if not _PLAIN.fullmatch(token):
            raise InvalidIdError(kind, token, "is not an encoded token")
        if len(token.encode("utf-8")) > MAX_ID_BYTES:
            raise InvalidIdError(kind, token, "is longer than any id")
        return token
    body = token[1:]
    if not _PLAIN.fullmatch(body) or len(body) % 4 == 1:
        raise InvalidIdError(kind, token, "is not an encoded token")
    try:
        value = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise InvalidIdError(kind, token, "is not an encoded token") from e
    try:
        canonical = encode_token(value, kind)
    except InvalidIdError as e:
        raise InvalidIdError(kind, token, f"does not encode a valid id: {e.reason}") from e
    if canonical != token:
        raise InvalidIdError(kind, token, f"is not the canonical token of its id ({canonical})")
    return value


def validate_prefix(prefix: object) -> str:
    """A prefix is a short identifier: it names subjects, streams and buckets."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise InvalidIdError(
            "prefix", prefix, "must match [A-Za-z][A-Za-z0-9_-]{0,31} (no dots or wildcards)"
        )
    return prefix


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bit: the hash nats-server's ``partition()`` transform uses."""
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


@dataclass(frozen=True)
class Names:
    """Subjects, streams, buckets and keys under one prefix.

    Every method taking an id validates and encodes it before returning, so
    nothing built here can split a subject or become a wildcard.
    """

    prefix: str = "sb"

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # -- streams and buckets ------------------------------------------------

    @property
    def envelope_stream(self) -> str:
        """The stream holding every session's envelopes."""
        return f"{self.prefix}_envelopes"

    @property
    def dead_letter_stream(self) -> str:
        """The stream holding envelopes no handler could take, with the reason."""
        return f"{self.prefix}_dead"

    @property
    def sessions_bucket(self) -> str:
        """KV bucket of session lifecycle records and idle timers."""
        return f"{self.prefix}_sessions"

    @property
    def registry_bucket(self) -> str:
        """KV bucket of node registry records (call id, session id)."""
        return f"{self.prefix}_registry"

    @property
    def workers_bucket(self) -> str:
        """KV bucket of worker leases."""
        return f"{self.prefix}_workers"

    @property
    def locks_bucket(self) -> str:
        """KV bucket of cluster-wide turn locks."""
        return f"{self.prefix}_locks"

    # -- buckets and streams of optional components ---------------------------

    @property
    def store_uses_bucket(self) -> str:
        """KV bucket of :class:`~sessionbus.bus.SessionStore` use marks."""
        return f"{self.prefix}_store_uses"

    @property
    def va_sessions_bucket(self) -> str:
        """KV bucket of the Vision Agents session registry store (default name)."""
        return f"{self.prefix}_va_sessions"

    @property
    def ag2_sessions_bucket(self) -> str:
        """KV bucket of the AG2 MCP session store (default name)."""
        return f"{self.prefix}_ag2_sessions"

    @property
    def ag2_history_stream(self) -> str:
        """Stream of the AG2 history storage (default name)."""
        return f"{self.prefix}_ag2_history"

    @property
    def ag2_history_root(self) -> str:
        """Subject root of the AG2 history storage: ``<root>.<...>``."""
        return f"{self.prefix}.ag2.history"

    # -- envelope subjects --------------------------------------------------

    def inbound(self, session_id: str) -> str:
        """Where clients publish a session's envelopes."""
        return f"{self.prefix}.in.{encode_token(session_id)}"

    @property
    def inbound_all(self) -> str:
        """The stream's ingest subject filter."""
        return f"{self.prefix}.in.*"

    def partition_transform(self, partitions: int) -> str:
        """Destination of the ingest transform: ``<prefix>.p.<n>.<sid>``."""
        return f"{self.prefix}.p.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"

    def stored(self, session_id: str, partitions: int) -> str:
        """The subject a session's envelopes are stored under."""
        token = encode_token(session_id)
        return f"{self.prefix}.p.{self.partition_of_token(token, partitions)}.{token}"

    def history_filter(self, session_id: str) -> str:
        """Filter matching one session's stored envelopes, whatever the partition."""
        return f"{self.prefix}.p.*.{encode_token(session_id)}"

    def partition_filter(self, partition: int) -> str:
        """Filter matching every envelope stored in ``partition``."""
        return f"{self.prefix}.p.{partition}.*"

    @staticmethod
    def partition_of_token(token: str, partitions: int) -> int:
        """The partition the server assigns to a session token."""
        return fnv1a_32(token.encode("ascii")) % partitions

    def partition_of(self, session_id: str, partitions: int) -> int:
        """The partition the server assigns to ``session_id``."""
        return self.partition_of_token(encode_token(session_id), partitions)

    def session_of_subject(self, subject: str) -> str:
        """The session id in an inbound or stored subject."""
        return decode_token(subject.rsplit(".", 1)[-1])

    def dead_letter(self, group: str, session_id: str) -> str:
        """Where a group's undeliverable envelopes of one session go."""
        return f"{self.prefix}.dead.{encode_token(group, 'group')}.{encode_token(session_id)}"

    @property
    def dead_letter_all(self) -> str:
        """The dead-letter stream's subject filter."""
        return f"{self.prefix}.dead.>"

    def worker_consumer(self, group: str, partition: int) -> str:
        """Durable name of a worker group's pinned pull consumer on one partition.

        A long group token is replaced by its hash so the name stays well
        inside the server's limit; the group itself is kept in the lease.
        """
        token = encode_token(group, "group")
        if len(token) > 48:
            token = "h" + hashlib.sha256(token.encode("ascii")).hexdigest()[:32]
        return f"{self.prefix}_w_{token}_{partition}"

    @property
    def worker_priority_group(self) -> str:
        """Priority group every worker consumer is pinned in (one per consumer)."""
        return "workers"

    # -- control and transient subjects -------------------------------------

    def closed(self, session_id: str) -> str:
        """The close/expiry broadcast of one session."""
        return f"{self.prefix}.ctl.{encode_token(session_id)}.closed"

    @property
    def closed_all(self) -> str:
        """Every session's close broadcast: subscribe once per node."""
        return f"{self.prefix}.ctl.*.closed"

    def opened(self, session_id: str) -> str:
        """The hint that a session's record was created or replaced (an id opened again)."""
        return f"{self.prefix}.ctl.{encode_token(session_id)}.opened"

    @property
    def opened_all(self) -> str:
        """Every session's open hint: subscribe once per node."""
        return f"{self.prefix}.ctl.*.opened"

    def worker_ping(self, group: str, worker_id: str) -> str:
        """Where a live worker answers pings from its own connection."""
        return (f"{self.prefix}.wk.{encode_token(group, 'group')}."
                f"{encode_token(worker_id, 'worker id')}")

    def interrupt(self, session_id: str) -> str:
        """The transient interrupt signal of one session (not stored)."""
        return f"{self.prefix}.ctl.{encode_token(session_id)}.interrupt"

    @property
    def interrupt_all(self) -> str:
        """Every session's interrupt signal."""
        return f"{self.prefix}.ctl.*.interrupt"

    def output(self, session_id: str, agent: str) -> str:
        """The transient token stream of an agent's running turn."""
        return f"{self.prefix}.out.{encode_token(session_id)}.{encode_token(agent, 'agent id')}"

    def agent_output_all(self, agent: str) -> str:
        """One agent's token streams in every session."""
        return f"{self.prefix}.out.*.{encode_token(agent, 'agent id')}"

    # -- KV keys ------------------------------------------------------------

    def registry_key(self, call_id: str, session_id: str) -> str:
        """Registry key of one session: ``<call>.<session>``."""
        return f"{encode_token(call_id, 'call id')}.{encode_token(session_id)}"

    def registry_call_filter(self, call_id: str) -> str:
        """Registry key filter matching every session of one call."""
        return f"{encode_token(call_id, 'call id')}.*"

    @property
    def registry_record_filter(self) -> str:
        """Registry key filter matching every session record (and no close flag)."""
        return "*.*"

    def registry_close_key(self, call_id: str, session_id: str) -> str:
        """Key of a session's close flag: ``<call>.<session>.close``.

        Three tokens, so neither :meth:`registry_call_filter` nor
        :attr:`registry_record_filter` ever matches it.
        """
        return f"{self.registry_key(call_id, session_id)}.close"

    @property
    def registry_close_filter(self) -> str:
        """Registry key filter matching every session's close flag."""
        return "*.*.close"

    @staticmethod
    def registry_ids_of_key(key: str) -> tuple[str, str]:
        """``(call_id, session_id)`` of a registry record or close-flag key."""
        parts = key.split(".")
        if len(parts) not in (2, 3):
            raise InvalidIdError("registry key", key, "is not <call>.<session>[.close]")
        return decode_token(parts[0], "call id"), decode_token(parts[1])

    def session_key(self, session_id: str) -> str:
        """Key of a session's lifecycle record."""
        return f"s.{encode_token(session_id)}"

    def session_timer_key(self, session_id: str) -> str:
        """Key whose per-key TTL is a session's idle timer."""
        return f"t.{encode_token(session_id)}"

    @property
    def session_record_filter(self) -> str:
        """Key filter matching every session's lifecycle record."""
        return "s.*"

    @property
    def session_timer_filter(self) -> str:
        """Key filter matching every session's idle timer."""
        return "t.*"

    @staticmethod
    def session_of_key(key: str) -> str:
        """The session id in a lifecycle record or idle timer key."""
        return decode_token(key.split(".", 1)[-1])

    def lock_key(self, session_id: str) -> str:
        """Key of a session's turn lock lease."""
        return f"l.{encode_token(session_id)}"

    def worker_key(self, group: str, worker_id: str) -> str:
        """Key of one worker's lease in its group."""
        return f"{encode_token(group, 'group')}.{encode_token(worker_id, 'worker id')}"

    def worker_group_filter(self, group: str) -> str:
        """Key filter matching every worker lease of one group."""
        return f"{encode_token(group, 'group')}.*"

    def completion_key(self, group: str, session_id: str) -> str:
        """Key of a group's completion record of one session (in the workers bucket).

        Three tokens, so no lease key (two) and no group's lease filter matches it.
        """
        return f"d.{encode_token(group, 'group')}.{encode_token(session_id)}"

    def completion_filter(self, group: str) -> str:
        """Key filter matching every completion record of one group."""
        return f"d.{encode_token(group, 'group')}.*"


def kv_subject(bucket: str, key: str, domain: str | None = None) -> str:
    """The subject a raw write to ``bucket``/``key`` goes to.

    Through a leaf node with its own JetStream domain, writes must name the
    hub's domain or they land in the leaf's (absent) bucket.
    """
    if domain:
        return f"$JS.{domain}.API.$KV.{bucket}.{key}"
    return f"$KV.{bucket}.{key}"
