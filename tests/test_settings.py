"""Settings parsing and validation."""

from __future__ import annotations

import pytest
from sessionbus.bus.errors import ConfigError
from sessionbus.bus.settings import BusSettings, check_ttl


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
