"""Redis URLs: every form is understood, a bad one is refused by name, no password is shown."""

from __future__ import annotations

import pytest

from drainbus.bus.connection import parse_url, redacted_url
from drainbus.config import load_settings
from drainbus.errors import ConfigError


def test_cluster_url_lists_startup_nodes_and_logs_in_to_them() -> None:
    """Every host is a startup node (6379 by default); user and password are decoded."""
    url = parse_url("redis+cluster://bus:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002")

    assert url.kind == "cluster"
    assert url.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert url.node_options == {"username": "bus", "password": "p@ss", "ssl": False}


def test_sentinel_url_names_service_and_db_and_keeps_sentinels_password_apart() -> None:
    """The URL's password is the data nodes'; sentinels get only ``sentinel_password``."""
    url = parse_url("rediss+sentinel://:data@s1,s2:26380/cache/2?sentinel_password=watch")

    assert (url.kind, url.service) == ("sentinel", "cache")
    assert url.hosts == (("s1", 26379), ("s2", 26380))
    assert url.node_options == {"password": "data", "ssl": True, "db": 2}
    assert url.sentinel_options == {"password": "watch", "ssl": True}


@pytest.mark.parametrize(
    "url", ["redis://:pw@cache:6379/2", "rediss://cache", "unix:///run/redis.sock?db=1"]
)
def test_one_server_urls_are_left_to_redis_py(url: str) -> None:
    """redis://, rediss:// and unix:// keep working exactly as redis-py reads them."""
    assert (parse_url(url).kind, parse_url(url).url) == ("single", url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param("http://:secret@cache:6379", "is not a Redis URL", id="scheme"),
        pytest.param("redis+cluster://:secret@h1:x", "port 'x' is not a number", id="port"),
        pytest.param("redis+cluster://:secret@h1,,h2", "a host is missing", id="empty-host"),
        pytest.param("redis+cluster://:secret@h1/3", "only database 0", id="cluster-db"),
        pytest.param("redis+sentinel://:secret@s1", "name the service", id="no-service"),
        pytest.param("redis+sentinel://:secret@s1/svc/x", "database 'x'", id="bad-db"),
        pytest.param("redis+sentinel://s1/svc?sentinel_password=secret&x=1",
                     "unknown option 'x'", id="unknown-option"),
        pytest.param("redis+cluster://:secret@h1?ssl_cert_reqs=none", "is for TLS",
                     id="tls-option-without-tls"),
    ],
)  # fmt: skip
def test_malformed_url_is_refused_without_echoing_passwords(url: str, problem: str) -> None:
    """The message says what is wrong and shows the URL with its passwords masked."""
    with pytest.raises(ConfigError) as caught:
        parse_url(url)

    assert problem in caught.value.message
    assert "secret" not in caught.value.message
    assert "***" in caught.value.message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis+cluster://u:p@ss@h1:1,h2:2", "redis+cluster://***@h1:1,h2:2"),
        ("redis+sentinel://s1/svc?sentinel_password=pw&sentinel_username=u",
         "redis+sentinel://s1/svc?sentinel_password=***&sentinel_username=u"),
        ("unix:///run/redis.sock?password=pw&db=1", "unix:///run/redis.sock?password=***&db=1"),
    ],
)  # fmt: skip
def test_redacted_url_hides_every_password(url: str, shown: str) -> None:
    """User info and ``…password=`` options are masked; the rest stays readable."""
    assert redacted_url(url) == shown


def test_config_checks_the_url_when_loading() -> None:
    """A malformed cluster URL is a config error naming the key, before anything starts."""
    assert load_settings(None, {"redis_url": "redis+cluster://h1:7000"}).redis_url

    with pytest.raises(ConfigError, match=r"redis_url.*port 'x' is not a number"):
        load_settings(None, {"redis_url": "redis+cluster://h1:x"})
