"""Settings parsing and validation."""

from __future__ import annotations

import dataclasses
import re

import pytest
from sessionbus.bus.errors import ConfigError
from sessionbus.bus.settings import URL_OPTIONS, BusSettings, check_ttl


def test_from_url_parses_auth_hosts_and_options() -> None:
    s = BusSettings.from_url("nats://u:p%40ss@h1:4222,h2:4223?prefix=app&partitions=128&replicas=3")
    assert s.servers == ("nats://h1:4222", "nats://h2:4223")
    assert (s.user, s.password, s.prefix, s.partitions, s.replicas) == ("u", "p@ss", "app", 128, 3)
    assert s.connect_options()["user"] == "u"


def test_token_in_url() -> None:
    s = BusSettings.from_url("nats://secret@localhost:4222")
    assert s.token == "secret" and s.connect_options()["token"] == "secret"


def test_from_env_without_url_means_embedded() -> None:
    assert BusSettings.from_env({}).embedded
    assert not BusSettings.from_env({"SESSIONBUS_URL": "nats://h:1"}).embedded


@pytest.mark.parametrize("url", ["http://h:1", "nats://", "nats://h:1?bogus=1",
                                 "nats://h:1?partitions=many", "nats://h:1?replicas=2"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        BusSettings.from_url(url)


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "5", True, None])
def test_bad_ttls(ttl: object) -> None:
    with pytest.raises(ConfigError):
        check_ttl(ttl)


def test_ttl_accepts_fractions() -> None:
    assert check_ttl(0.25) == 0.25
    assert check_ttl(None, optional=True) is None


def test_every_server_of_a_comma_list_is_kept_and_bare_hosts_get_a_scheme() -> None:
    s = BusSettings.from_url("h1:4222, h2:4222,h3")
    assert s.servers == ("nats://h1:4222", "nats://h2:4222", "nats://h3")
    both = BusSettings.from_url(["nats://a:1?prefix=x", "nats://b:2?prefix=x"])
    assert both.servers == ("nats://a:1", "nats://b:2") and both.prefix == "x"
    with pytest.raises(ConfigError, match="disagree on option 'prefix'"):
        BusSettings.from_url(["nats://a:1?prefix=x", "nats://b:2?prefix=y"])


@pytest.mark.parametrize(("url", "message"), [
    ("nats://h:1?bogus=1", "unknown URL option 'bogus'; known: "),
    ("nats://h:1?prefix=a&prefix=b", "URL option 'prefix' given twice"),
    ("nats://h:1?partitions=7.5", "setting partitions='7.5' is not valid"),
    ("nats://h:1?replicas=2", "replicas must be 1, 3 or 5"),
    ("http://h:1", "unsupported URL scheme 'http'"),
])
def test_url_errors_name_the_option(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        BusSettings.from_url(url)


def test_url_options_and_overrides_are_typed() -> None:
    s = BusSettings.from_url("nats://h:1?session_ttl=none&lock_refresh=2&duplicate_window=30",
                             partitions=9)
    assert (s.session_ttl, s.lock_refresh, s.duplicate_window, s.partitions) == (None, 2.0, 30.0, 9)
    assert s.replicas is None  # not asked: whatever exists (1 for a new stream)


def test_url_options_table_covers_only_real_fields() -> None:
    fields = {f.name for f in dataclasses.fields(BusSettings)}
    assert {o.field for o in URL_OPTIONS.values()} <= fields


def test_repr_and_describe_hide_secrets() -> None:
    s = BusSettings.from_url("nats://alice:hunter2@h1:4222,h2:4222?replicas=3&prefix=x")
    text = repr(s)
    assert "hunter2" not in text and "password='***'" in text
    assert "replicas=3" in text and "prefix='x'" in text and "h2:4222" in text
    assert "hunter2" not in str(s.describe())
    token = BusSettings(servers=("nats://sekrit@h:1",), token="sekrit")
    assert "sekrit" not in repr(token) and "sekrit" not in str(token.describe())


def test_options_are_refused_in_plain_server_lists() -> None:
    with pytest.raises(ConfigError, match="from_url"):
        BusSettings(servers=("nats://h:1?replicas=3",))


def test_event_loop_setting_and_choice() -> None:
    import asyncio

    from sessionbus.bus._loop import loop_factory, run

    assert BusSettings().event_loop == "auto"
    with pytest.raises(ConfigError):
        BusSettings(event_loop="trio")
    assert loop_factory("asyncio") is None

    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert run(kind(), event_loop="asyncio") == "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError):
            loop_factory("uvloop")
    else:
        assert run(kind(), event_loop="auto") == "uvloop"


async def test_a_bus_asked_for_uvloop_refuses_another_loop() -> None:
    from sessionbus.bus import SessionBus

    bus = SessionBus("nats://127.0.0.1:1", event_loop="uvloop")
    with pytest.raises(ConfigError, match="uvloop"):
        await bus.start()
