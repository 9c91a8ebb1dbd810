"""Wire models and codec."""

from __future__ import annotations

import os
import threading
import uuid

import msgpack
import pytest
from sessionbus.schemas import (
    FORMAT_VERSION,
    DecodeError,
    Envelope,
    SessionInfo,
    SessionMetadata,
    SessionState,
    TaskInfo,
    TaskState,
    decode,
    decode_map,
    encode,
    idempotent_envelope_id,
    new_envelope_id,
)
from sessionbus.schemas.codec import _ENVELOPE_DEFAULTS


def test_envelope_roundtrip_keeps_every_field() -> None:
    env = Envelope(
        session_id="s 1.*", sender_id="alice", audience=["bob"], event_type="text",
        event_data={"text": "hi", "n": [1, 2]}, causation_id="c", trace_id="t", depth=2,
        idempotency_key="k", ttl_seconds=1.5, priority=3,
    )
    back = decode(encode(env), Envelope)
    assert back == env
    assert back.audience == ("bob",)
    assert back.content == "hi"


def test_an_envelope_is_written_without_the_fields_at_their_default() -> None:
    plain = Envelope(session_id="s", event_data={"text": "hi"})
    assert set(decode_map(encode(plain))) == {"envelope_id", "session_id", "event_data",
                                              "created_at"}
    assert decode(encode(plain), Envelope) == plain
    bare = Envelope(session_id="s")
    assert set(decode_map(encode(bare))) == {"envelope_id", "session_id", "created_at"}
    assert decode(encode(bare), Envelope) == bare
    # Every field away from its default is written, each of them.
    full = Envelope(
        session_id="s", sender_id="a", audience=["b"], event_type="x", event_data={"k": 1},
        causation_id="c", trace_id="t", depth=1, idempotency_key="k", ttl_seconds=2.0,
        priority=1,
    )
    assert set(decode_map(encode(full))) == set(Envelope.model_fields)
    # An empty audience (nobody) is not the default (everyone but the sender).
    nobody = Envelope(session_id="s", audience=[])
    assert decode_map(encode(nobody))["audience"] == []
    assert decode(encode(nobody), Envelope).audience == ()


def test_the_defaults_left_out_of_an_envelope_stay_what_every_reader_fills_in() -> None:
    # Stored envelopes rely on these: changing one would change what stored
    # history reads as. Every release so far has had exactly these.
    assert dict(_ENVELOPE_DEFAULTS) == {
        "sender_id": "", "audience": None, "event_type": "text", "event_data": {},
        "causation_id": None, "trace_id": None, "depth": 0, "idempotency_key": None,
        "ttl_seconds": None, "priority": 0,
    }


def test_an_envelope_written_with_every_field_reads_the_same() -> None:
    # What earlier writers stored: every field, defaults included.
    env = Envelope(session_id="s", sender_id="a", event_data={"text": "hi"})
    written_in_full = msgpack.packb([FORMAT_VERSION, env.model_dump(mode="json")],
                                    use_bin_type=True)
    assert len(decode_map(written_in_full)) == len(Envelope.model_fields)
    assert decode(written_in_full, Envelope) == env
    assert len(encode(env)) < len(written_in_full) * 0.75


def test_audience_rules() -> None:
    broadcast = Envelope(session_id="s", sender_id="a")
    assert broadcast.is_for("b") and not broadcast.is_for("a")
    targeted = Envelope(session_id="s", sender_id="a", audience=["c"])
    assert targeted.is_for("c") and not targeted.is_for("b")


def test_envelope_ttl_expiry() -> None:
    env = Envelope(session_id="s", created_at=100.0, ttl_seconds=2)
    assert not env.is_expired(now=101.9)
    assert env.is_expired(now=102.0)
    assert not Envelope(session_id="s").is_expired()


@pytest.mark.parametrize("bad", [{"depth": -1}, {"priority": 10}, {"ttl_seconds": 0},
                                 {"session_id": ""}])
def test_envelope_rejects_bad_fields(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {"session_id": "s", **bad}
    with pytest.raises(ValueError):
        Envelope.model_validate(fields)


def test_new_envelope_ids_are_random_uuids_never_handed_out_twice() -> None:
    made: list[str] = []

    def make() -> None:
        made.extend(new_envelope_id() for _ in range(5_000))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == len(made) == 20_000
    for envelope_id in made[:200]:
        parsed = uuid.UUID(envelope_id)
        assert parsed.hex == envelope_id and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # A forked child does not repeat what its parent still holds unhanded.
    new_envelope_id()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's only work
        os.write(write_end, "".join(new_envelope_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(child, 0)
    theirs = {text[i:i + 32] for i in range(0, len(text), 32)}
    ours = {new_envelope_id() for _ in range(100)}
    assert len(theirs) == 100 and not theirs & ours


def test_idempotent_id_is_stable_and_scoped() -> None:
    assert idempotent_envelope_id("s", "k") == idempotent_envelope_id("s", "k")
    assert idempotent_envelope_id("s", "k") != idempotent_envelope_id("t", "k")
    # The uuid5 it always was (ids derived by an older release must match).
    namespace = uuid.UUID("6f1c3c3e-4b0a-4c55-9a53-2f4f0c3f6a11")
    for sid, key in [("s", "k"), ("", ""), ("s\u00e9\U0001f600", "reply:g:" + "a" * 500 + ":3"),
                     ("a.b", "k\x00x")]:
        assert idempotent_envelope_id(sid, key) == uuid.uuid5(namespace, f"{sid}\x00{key}").hex


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb({"a": 1}), "not a [version, body] pair"),
        (msgpack.packb([99, {}]), "unsupported format version"),
        (msgpack.packb([FORMAT_VERSION, [1]]), "body is not a map"),
        (msgpack.packb([FORMAT_VERSION, {"session_id": 5}]), "invalid Envelope"),
    ],
)
def test_decode_errors_carry_raw_bytes(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw, Envelope)
    assert info.value.raw == raw
    assert reason in str(info.value)


def test_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode_map(b"")


def test_session_info_from_dict_ignores_unknown_keys() -> None:
    data = {"session_id": "s", "call_id": "c", "node_id": "n", "started_at": 1.0,
            "metrics_updated_at": 2.0, "metrics": {"tokens": 3}, "expires_at": 9.0, "x": 1}
    info = SessionInfo.from_dict(data)
    assert info.to_dict() == {k: data[k] for k in ("session_id", "call_id", "node_id",
                                                   "started_at", "metrics_updated_at",
                                                   "metrics")}


def test_terminal_states() -> None:
    assert {s for s in SessionState if s.is_terminal} == {SessionState.CLOSED,
                                                          SessionState.EXPIRED}
    assert {s for s in TaskState if s.is_terminal} == {TaskState.COMPLETED, TaskState.FAILED,
                                                       TaskState.EXPIRED}


def test_terminated_cascades_to_open_tasks_only() -> None:
    meta = SessionMetadata(session_id="s", tasks={
        "a": TaskInfo(task_id="a", state=TaskState.RUNNING),
        "b": TaskInfo(task_id="b", state=TaskState.COMPLETED),
        "c": TaskInfo(task_id="c", state=TaskState.QUEUED),
    }, agents_streaming=["x"])
    closed = meta.terminated(SessionState.CLOSED, "done", now=5.0)
    assert closed.is_terminal() and closed.close_reason == "done" and closed.closed_at == 5.0
    assert {k: t.state for k, t in closed.tasks.items()} == {
        "a": TaskState.EXPIRED, "b": TaskState.COMPLETED, "c": TaskState.EXPIRED}
    assert closed.agents_streaming == []
    assert not meta.is_terminal()
