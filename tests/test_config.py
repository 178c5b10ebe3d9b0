"""Settings: defaults, the TOML file, the environment, overrides, and one-line errors."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from drainbus.config import (
    AclRule,
    ServerSettings,
    Settings,
    load_settings,
    parse_duration,
    parse_listen,
)
from drainbus.errors import ConfigError, ExitCode

WriteConfig = Callable[[str], Path]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DRAINBUS_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("DRAINBUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Write a TOML config file (dedented) and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "drainbus.toml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def load_error(config_path: Path | None = None, overrides: dict[str, Any] | None = None) -> str:
    """Load settings that must fail; return the ConfigError message after checking its shape."""
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path, overrides)
    assert caught.value.exit_code == ExitCode.CONFIG
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- where values come from -------------------------------------------------------------------


def test_defaults() -> None:
    """With no file, environment or overrides, every setting has its documented default."""
    settings = load_settings()

    assert settings.redis_url is None
    assert settings.data_dir == Path("data")
    assert settings.namespace == "drainbus"
    assert settings.server.listen == "0.0.0.0:2222"
    assert settings.server.listen_address == ("0.0.0.0", 2222)
    assert settings.server.users_dir == Path("keys/users")
    assert settings.server.host_keys_dir == Path("keys/host")
    assert settings.server.admins == ()
    assert settings.topics.max_len == 100_000
    assert settings.topics.retention == 7 * 86400.0
    assert settings.acl == ()


def test_file_values(write_config: WriteConfig) -> None:
    """Every section of the TOML file lands in the typed settings, durations in seconds."""
    path = write_config(
        """
        redis_url = "redis://cache.internal:6379/2"
        namespace = "staging"

        [server]
        listen = "127.0.0.1:2200"
        admins = ["root", "ops"]
        users_dir = "/etc/drainbus/users"
        login_timeout = "250ms"

        [topics]
        max_len = 500
        retention = "10m"

        [[acl]]
        topics = ["deploys/**"]
        publish = ["ci"]
        subscribe = ["*"]
        """
    )

    settings = load_settings(path)

    assert settings.redis_url == "redis://cache.internal:6379/2"
    assert settings.namespace == "staging"
    assert settings.server.listen_address == ("127.0.0.1", 2200)
    assert settings.server.admins == ("root", "ops")
    assert settings.server.users_dir == Path("/etc/drainbus/users")
    assert settings.server.login_timeout == 0.25
    assert settings.topics.max_len == 500
    assert settings.topics.retention == 600.0
    assert settings.acl == (AclRule(topics=("deploys/**",), publish=("ci",), subscribe=("*",)),)


@pytest.mark.parametrize(
    ("name", "value", "read", "expected"),
    [
        pytest.param(
            "DRAINBUS_REDIS_URL",
            "redis://env:6379/0",
            lambda s: s.redis_url,
            "redis://env:6379/0",
            id="redis-url",
        ),
        pytest.param(
            "DRAINBUS_SERVER__LISTEN",
            "[::1]:2022",
            lambda s: s.server.listen_address,
            ("::1", 2022),
            id="server-listen",
        ),
        pytest.param(
            "DRAINBUS_SERVER__ADMINS",
            '["a"]',
            lambda s: s.server.admins,
            ("a",),
            id="server-admins-json",
        ),
        pytest.param(
            "DRAINBUS_TOPICS__RETENTION",
            "2h",
            lambda s: s.topics.retention,
            7200.0,
            id="topics-retention",
        ),
        pytest.param(
            "DRAINBUS_ACL",
            '[{"topics": ["public/**"], "subscribe": ["*"]}]',
            lambda s: s.acl,
            (AclRule(topics=("public/**",), subscribe=("*",)),),
            id="acl-json",
        ),
        pytest.param(
            "DRAINBUS_REDIS_URL", "", lambda s: s.redis_url, None, id="empty-url-is-unset"
        ),
        pytest.param(
            "DRAINBUS_TOPICS__DURABILITY",
            "fsync",
            lambda s: (s.topics.durability_for("a/b"), s.topics.durability_for("cache-drain")),
            ("fsync", "fsync"),
            id="durability-one-mode-for-all",
        ),
        pytest.param(
            "DRAINBUS_TOPICS__DURABILITY",
            '{"cache-*": "replica", "**": "fsync", "x": "os"}',
            lambda s: (s.topics.durability_for("cache-drain"), s.topics.durability_for("x")),
            ("replica", "fsync"),  # the first matching pattern decides
            id="durability-per-pattern-json",
        ),
        pytest.param(
            "DRAINBUS_TOPICS__DURABILITY",
            '{"cache-drain": "fsync"}',
            lambda s: s.topics.durability_for("cache-drainage"),
            "os",
            id="durability-default-os",
        ),
    ],
)
def test_environment_values(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    read: Callable[[Settings], object],
    expected: object,
) -> None:
    """DRAINBUS_<NAME>, with __ between section and key, sets that setting."""
    monkeypatch.setenv(name, value)

    assert read(load_settings()) == expected


def test_environment_overrides_one_key_of_a_file_section(
    monkeypatch: pytest.MonkeyPatch, write_config: WriteConfig
) -> None:
    """An environment value replaces its own key; the file's other keys in that section stay."""
    path = write_config(
        """
        [server]
        listen = "127.0.0.1:2200"
        admins = ["root"]
        """
    )
    monkeypatch.setenv("DRAINBUS_SERVER__LISTEN", "10.0.0.1:22")

    settings = load_settings(path)

    assert settings.server.listen == "10.0.0.1:22"
    assert settings.server.admins == ("root",)


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        pytest.param((), "0.0.0.0:2222", id="defaults"),
        pytest.param(("file",), "127.0.0.1:1001", id="file-over-defaults"),
        pytest.param(("file", "env"), "127.0.0.1:1002", id="env-over-file"),
        pytest.param(("file", "env", "override"), "127.0.0.1:1003", id="override-over-env"),
        pytest.param(("file", "override"), "127.0.0.1:1003", id="override-over-file"),
    ],
)
def test_precedence(
    monkeypatch: pytest.MonkeyPatch,
    write_config: WriteConfig,
    layers: tuple[str, ...],
    expected: str,
) -> None:
    """Overrides beat the environment, which beats the file, which beats the defaults."""
    path = write_config('[server]\nlisten = "127.0.0.1:1001"\n') if "file" in layers else None
    if "env" in layers:
        monkeypatch.setenv("DRAINBUS_SERVER__LISTEN", "127.0.0.1:1002")
    overrides = {"server": {"listen": "127.0.0.1:1003"}} if "override" in layers else None

    assert load_settings(path, overrides).server.listen == expected


def test_none_overrides_are_ignored(
    monkeypatch: pytest.MonkeyPatch, write_config: WriteConfig
) -> None:
    """A command-line flag left unset (None) does not hide the file's or environment's value."""
    path = write_config('data_dir = "/var/lib/drainbus"\n[server]\nlisten = "127.0.0.1:1001"\n')
    monkeypatch.setenv("DRAINBUS_REDIS_URL", "redis://env:6379/0")

    settings = load_settings(
        path, {"redis_url": None, "data_dir": None, "server": {"listen": None}}
    )

    assert settings.redis_url == "redis://env:6379/0"
    assert settings.data_dir == Path("/var/lib/drainbus")
    assert settings.server.listen == "127.0.0.1:1001"


@pytest.mark.parametrize(
    "name", ["DRAINBUS_CONFIG", "DRAINBUS_TEST_REDIS_URL", "DRAINBUS_LOG_LEVEL"]
)
def test_unrelated_environment_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """DRAINBUS_* variables that are not settings (CLI, test fixtures) don't break loading."""
    monkeypatch.setenv(name, "redis://elsewhere:6379/9")

    assert load_settings().redis_url is None


# --- errors ---------------------------------------------------------------------------------


def test_unknown_key_names_it_and_lists_known_keys(write_config: WriteConfig) -> None:
    """A misspelt key is refused in one line naming the file, the key and the keys it could be."""
    path = write_config('[server]\nlisen = "0.0.0.0:2222"\n')

    message = load_error(path)

    assert message.startswith(f"config file {path}: server.lisen: unknown setting")
    known = message.split("known keys here: ", 1)[1]
    assert known.split(", ") == sorted(ServerSettings.model_fields)
    assert "listen" in known.split(", ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("bogus = 1\n", "bogus", id="top-level"),
        pytest.param("[topics]\nmaxlen = 5\n", "topics.maxlen", id="topics"),
        pytest.param('[[acl]]\ntopics = ["a"]\npublsh = ["*"]\n', "acl.0.publsh", id="acl-rule"),
    ],
)
def test_unknown_key_anywhere_is_refused(write_config: WriteConfig, text: str, key: str) -> None:
    """Unknown keys are refused at any level, each named by its dotted path."""
    message = load_error(write_config(text))

    assert f": {key}: unknown setting; known keys here: " in message


def test_unknown_key_from_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt DRAINBUS_SECTION__KEY is refused like a misspelt file key."""
    monkeypatch.setenv("DRAINBUS_SERVER__LISEN", "0.0.0.0:2222")

    message = load_error()

    assert message.startswith("settings: server.lisen: unknown setting")
    assert "listen" in message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param(
            '[server]\nlisten = "nope"\n',
            ["server.listen", "'nope'", "HOST:PORT"],
            id="listen-without-port",
        ),
        pytest.param(
            '[server]\nlisten = "0.0.0.0:70000"\n',
            ["server.listen", "'0.0.0.0:70000'", "HOST:PORT"],
            id="listen-port-too-big",
        ),
        pytest.param(
            '[topics]\nretention = "5x"\n',
            ["topics.retention", "'5x'", "is not a duration", "ms, s, m, h or d"],
            id="bad-duration",
        ),
        pytest.param(
            "[topics]\nretention = -1\n",
            ["topics.retention", "greater than or equal to 0"],
            id="negative-duration",
        ),
        pytest.param(
            'redis_url = "http://cache:6379"\n',
            ["redis_url", "'http://cache:6379'", "redis://, rediss:// or unix://"],
            id="redis-url-scheme",
        ),
        pytest.param(
            "[server]\nmax_connections = 0\n",
            ["server.max_connections", "greater than or equal to 1", "(got 0)"],
            id="limit-below-minimum",
        ),
        pytest.param(
            '[[acl]]\ntopics = ["/abs"]\n',
            ["acl.0.topics", "'/abs' is not a topic name or glob"],
            id="acl-pattern",
        ),
    ],
)
def test_bad_value_names_key_and_expectation(
    write_config: WriteConfig, text: str, fragments: list[str]
) -> None:
    """A bad value is refused in one line naming the file, key, value and what is expected."""
    path = write_config(text)

    message = load_error(path)

    assert message.startswith(f"config file {path}: ")
    for fragment in fragments:
        assert fragment in message


def test_invalid_toml_names_the_file(write_config: WriteConfig) -> None:
    """A file that is not TOML is refused naming the file and where parsing stopped."""
    path = write_config("[server\nlisten = 1\n")

    message = load_error(path)

    assert message.startswith(f"config file {path} is not valid TOML: ")
    assert "line 1" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A config path that does not exist is refused naming it."""
    path = tmp_path / "absent.toml"

    assert load_error(path) == f"config file {path} does not exist"


def test_environment_list_that_is_not_json_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A list in the environment that is not JSON is one ConfigError line, not a traceback."""
    monkeypatch.setenv("DRAINBUS_SERVER__ADMINS", "alice")

    message = load_error()

    assert '"server"' in message
    assert "JSON" in message


# --- values and parsers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("30s", 30.0, id="seconds"),
        pytest.param("1.5s", 1.5, id="fractional"),
        pytest.param("10m", 600.0, id="minutes"),
        pytest.param("2h", 7200.0, id="hours"),
        pytest.param("7d", 604800.0, id="days"),
        pytest.param(" 2 h ", 7200.0, id="spaces"),
        pytest.param("45", 45.0, id="bare-number-string"),
        pytest.param(30, 30.0, id="int"),
        pytest.param(1.5, 1.5, id="float"),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    """Durations are numbers of seconds or a number with ms, s, m, h or d."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("5x", id="unknown-unit"),
        pytest.param("", id="empty"),
        pytest.param("m", id="unit-only"),
        pytest.param("1e3", id="exponent"),
        pytest.param(True, id="bool"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    """Anything else is a ValueError naming the accepted units."""
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "address"),
    [
        pytest.param("[::1]:2222", ("::1", 2222), id="ipv6"),
        pytest.param("127.0.0.1:22", ("127.0.0.1", 22), id="ipv4"),
        pytest.param("bus.internal:2222", ("bus.internal", 2222), id="hostname"),
        pytest.param(":2222", ("0.0.0.0", 2222), id="all-interfaces"),
        pytest.param("localhost:0", ("localhost", 0), id="any-port"),
    ],
)
def test_parse_listen(value: str, address: tuple[str, int]) -> None:
    """HOST:PORT splits into host and port; brackets come off IPv6 hosts; no host means all."""
    assert parse_listen(value) == address


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("localhost", id="no-port"),
        pytest.param("localhost:", id="empty-port"),
        pytest.param("localhost:ssh", id="named-port"),
        pytest.param("localhost:65536", id="port-too-big"),
        pytest.param("localhost:-1", id="negative-port"),
    ],
)
def test_parse_listen_rejects(value: str) -> None:
    """A missing, non-numeric or out-of-range port is a ValueError showing the expected form."""
    with pytest.raises(ValueError, match=r"is not HOST:PORT"):
        parse_listen(value)


@pytest.mark.parametrize(
    "assign",
    [
        pytest.param(lambda s: setattr(s, "redis_url", "redis://other"), id="top-level"),
        pytest.param(lambda s: setattr(s.server, "listen", "0.0.0.0:1"), id="server-section"),
        pytest.param(lambda s: setattr(s.topics, "max_len", 1), id="topics-section"),
    ],
)
def test_settings_are_frozen(assign: Callable[[Settings], None]) -> None:
    """Settings cannot be changed after loading, at any level."""
    settings = load_settings()

    with pytest.raises(ValidationError, match="frozen"):
        assign(settings)


def test_redis_password_stays_out_of_repr() -> None:
    """repr(settings) never shows the Redis URL, which may carry a password."""
    settings = load_settings(None, {"redis_url": "redis://:hunter2@cache:6379/0"})

    assert settings.redis_url == "redis://:hunter2@cache:6379/0"
    assert "hunter2" not in repr(settings)


def test_refill_window_defaults_to_10s_and_reads_durations(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain.refill_window is 10 s unless set, from the file or DRAINBUS_DRAIN__REFILL_WINDOW."""
    assert load_settings().drain.refill_window == 10.0
    path = write_config('[drain]\nrefill_window = "1m"\n')
    assert load_settings(path).drain.refill_window == 60.0
    monkeypatch.setenv("DRAINBUS_DRAIN__REFILL_WINDOW", "0")
    assert load_settings(path).drain.refill_window == 0.0


@pytest.mark.parametrize(("workers", "expected"), [(0, 1), (1, 1)])
def test_off_linux_serve_runs_one_process(
    monkeypatch: pytest.MonkeyPatch, workers: int, expected: int
) -> None:
    """Workers need Linux (SO_REUSEPORT, pidfd, PDEATHSIG): elsewhere the default is one."""
    monkeypatch.setattr(sys, "platform", "darwin")
    assert load_settings(None, {"server": {"workers": workers}}).server.worker_count == expected


def test_off_linux_several_workers_is_one_clear_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking for workers off Linux says so in one line (exit 78), not with a traceback."""
    monkeypatch.setattr(sys, "platform", "darwin")
    settings = load_settings(None, {"server": {"workers": 4}})
    with pytest.raises(ConfigError, match=r"server.workers = 4 needs Linux; on darwin"):
        _ = settings.server.worker_count


def test_every_duration_setting_takes_the_same_forms() -> None:
    """Drain targets' durations read "500ms" and "2s" like the server's (once exit 78)."""
    settings = load_settings(
        None,
        {
            "server": {"login_timeout": "2s"},
            "drain": {
                "cloudflare": {"zone_id": "a" * 32, "api_token": "t", "batch_window": "500ms",
                               "timeout": "2s"},
                "http_purge": [{"url": "http://127.0.0.1:6081{path}", "timeout": "1.5s"}],
            },
        },
    )  # fmt: skip
    zone = settings.drain.cloudflare[0]
    assert (zone.batch_window, zone.timeout) == (0.5, 2.0)
    assert settings.drain.http_purge[0].timeout == 1.5
    assert settings.server.login_timeout == 2.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("10:30:100", (10, 30, 100), id="openssh-default"),
        pytest.param("5", (5, 100, 5), id="bare-full"),
    ],
)
def test_max_startups_is_start_rate_full(value: str, expected: tuple[int, int, int]) -> None:
    """server.max_startups reads like OpenSSH's MaxStartups."""
    assert load_settings(None, {"server": {"max_startups": value}}).server.startups == expected


@pytest.mark.parametrize("value", ["10:30", "30:30:10", "1:101:5", "0:30:100", "a:b:c"])
def test_bad_max_startups_names_the_form(value: str) -> None:
    """A max_startups that is not START:RATE:FULL stops start-up with the expected form."""
    with pytest.raises(ConfigError, match="START:RATE:FULL"):
        load_settings(None, {"server": {"max_startups": value}})
