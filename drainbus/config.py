"""One typed, frozen settings object, loaded and validated once at start-up.

Sources, strongest first: command-line flags, the environment, the TOML config file, the
defaults below. Every setting can come from the environment as ``DRAINBUS_<NAME>``, with
``__`` between a section and its key: ``DRAINBUS_REDIS_URL``, ``DRAINBUS_SERVER__LISTEN``,
``DRAINBUS_SERVER__ADMINS='["alice"]'`` (lists and tables as JSON). A systemd unit therefore
needs nothing but an ``EnvironmentFile``.

Relative paths are taken from the working directory drainbus starts in.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from drainbus.acl import glob_to_regex
from drainbus.backend_url import parse_url
from drainbus.drain.cloudflare_zones import CloudflareZoneConfig
from drainbus.drain.http_purge import HttpPurgeConfig
from drainbus.drain.nginx import NginxCacheConfig
from drainbus.drain.refill import DEFAULT_REFILL_WINDOW
from drainbus.drain.scope import ScopeRule
from drainbus.errors import ConfigError
from drainbus.hooks.settings import HooksSettings
from drainbus.http.settings import HttpSettings
from drainbus.values import (
    Durability,
    Duration,
    PositiveDuration,
    parse_duration,
    parse_listen,
)

__all__ = [
    "AclRule",
    "DrainSettings",
    "ServerSettings",
    "Settings",
    "TopicSettings",
    "load_settings",
    "parse_duration",
    "parse_listen",
    "parse_max_startups",
]


def parse_max_startups(value: str) -> tuple[int, int, int]:
    """Split ``START:RATE:FULL`` (or a bare ``FULL``) into integers.

    Raises ValueError unless 1 <= START <= FULL and 0 <= RATE <= 100.
    """
    parts = value.split(":")
    if len(parts) == 1:
        parts = [parts[0], "100", parts[0]]
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{value!r} is not START:RATE:FULL (for example 10:30:100)")
    start, rate, full = (int(p) for p in parts)
    if not 1 <= start <= full or rate > 100:
        raise ValueError(
            f"{value!r} is not START:RATE:FULL with 1 <= START <= FULL and RATE at most 100"
        )
    return start, rate, full


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    """The SSH front door: where it listens, who may log in, and its limits.

    With ``workers`` above 1 every worker process enforces the limits on its own, so
    ``max_connections``, ``max_connections_per_user``, ``max_sessions_per_user`` and the
    pre-authentication budget (``max_startups``, ``max_startups_per_source``) apply per worker.

    ``max_connections`` and ``max_connections_per_user`` count logged-in connections only;
    connections still authenticating have their own budget, so a flood of handshakes can never
    take the slots of users who have logged in.
    """

    listen: str = "0.0.0.0:2222"
    # Processes sharing the port (SO_REUSEPORT), each a node of the bus, under one supervisor;
    # 0: one per CPU this process may run on; 1: one process and no supervisor.
    workers: int = Field(0, ge=0)
    host_keys_dir: Path = Path("keys/host")
    users_dir: Path = Path("keys/users")
    admins: tuple[str, ...] = ()
    max_connections: int = Field(1000, ge=1)
    max_connections_per_user: int = Field(32, ge=1)
    max_sessions_per_user: int = Field(64, ge=1)
    # A logged-in connection with no session for this long is closed (0: never).
    idle_timeout: Duration = 60.0
    # Unauthenticated connections, like OpenSSH's MaxStartups "START:RATE:FULL": from START
    # on, refuse a new one with probability RATE%, rising linearly to 100% at FULL.
    max_startups: str = "10:30:100"
    max_startups_per_source: int = Field(10, ge=1)
    # Failed logins are logged once per source address and this interval, with their count.
    auth_failure_log_interval: Duration = 10.0
    login_timeout: Duration = 5.0
    keepalive_interval: Duration = 15.0
    keepalive_count_max: int = Field(3, ge=1)
    max_message_bytes: int = Field(65536, ge=1, le=64 * 1024 * 1024)
    # Storage quotas per user, over the topics they own (NAME, NAME/…); admins are exempt.
    # Over them, pub stores what fits and exits 75. max_user_bytes 0 turns both off.
    max_user_bytes: int = Field(64 * 1024 * 1024, ge=0)
    max_topics_per_user: int = Field(100, ge=1)
    subscriber_buffer_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    users_reload_interval: Duration = 2.0
    shutdown_grace: Duration = 5.0

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("max_startups")
    @classmethod
    def _check_max_startups(cls, value: str) -> str:
        parse_max_startups(value)
        return value

    @property
    def startups(self) -> tuple[int, int, int]:
        """``max_startups`` as (start, rate in percent, full)."""
        return parse_max_startups(self.max_startups)

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` split into (host, port)."""
        return parse_listen(self.listen)

    @property
    def worker_count(self) -> int:
        """How many worker processes to run: ``workers``, or the usable CPUs when it is 0.

        Several workers need Linux (SO_REUSEPORT spreading, pidfd, PR_SET_PDEATHSIG): on
        another OS the default is one process, and asking for more is a ConfigError.
        """
        if sys.platform != "linux":
            if self.workers > 1:
                raise ConfigError(
                    f"server.workers = {self.workers} needs Linux; on {sys.platform} drainbus "
                    "serves from one process: set workers = 1 (or leave it unset)"
                )
            return 1
        return self.workers or len(os.sched_getaffinity(0))


class TopicSettings(_Section):
    """How much history each topic's stream keeps, and how durable ``pub`` makes it.

    ``durability``: topic name or glob -> ``"os"`` (default), ``"fsync"`` or ``"replica"``
    (see :mod:`drainbus.bus.persistence`); the first matching pattern decides. A bare mode
    applies to every topic. ``durability_timeout``: how long ``pub`` waits for the fsync or
    the replica before it exits 75.
    """

    max_len: int = Field(100_000, ge=1)
    # Bytes a topic's stream keeps at most: the oldest entries go first, as for max_len (0: no cap).
    max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    retention: Duration = 7 * 86400.0
    # (a union, not a dict a validator fills from a bare mode: so the environment may say
    # DRAINBUS_TOPICS__DURABILITY=fsync, where a dict alone would have to be JSON)
    durability: dict[str, Durability] | Durability = {}
    durability_timeout: PositiveDuration = Field(5.0, le=9.0)  # below the socket timeout (10 s)

    @property
    def durability_patterns(self) -> dict[str, Durability]:
        """``durability`` as pattern -> mode (a bare mode is every topic's: ``**``)."""
        modes = self.durability
        return {"**": modes} if isinstance(modes, str) else modes

    def durability_for(self, topic: str) -> Durability:
        """The mode of the first pattern matching ``topic``; ``"os"`` if none does."""
        for pattern, mode in self.durability_patterns.items():
            if glob_to_regex(pattern).match(topic):
                return mode
        return "os"


class AclRule(_Section):
    """Who may publish and subscribe on topics matching ``topics``.

    Patterns are topic names or globs (``*`` within one segment, ``**`` across segments).
    Principals: ``"*"`` any authenticated user, ``"@admins"``, or user names.
    """

    topics: tuple[str, ...] = Field(min_length=1)
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    @field_validator("topics")
    @classmethod
    def _check_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not pattern or pattern.startswith("/") or any(c.isspace() for c in pattern):
                raise ValueError(f"{pattern!r} is not a topic name or glob")
        return value


class DrainSettings(_Section):
    """The cache-drain consumer: which topic, this node's name, the targets it drains."""

    topic: str = "cache-drain"
    node: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_host: str | None = None
    owner_separator: str = Field("-", min_length=1, max_length=8)
    max_deliveries: int = Field(5, ge=1)
    # Purge lines a user may publish per minute, in bursts of up to purge_burst_per_user: one
    # budget per user across every node and worker (kept in Redis); admins are exempt; 0: off.
    max_purges_per_user: int = Field(1000, ge=0)
    purge_burst_per_user: int = Field(5000, ge=1)
    retry_after: Duration = 10.0
    # How long after a purge the nginx targets evict stale copies that requests in flight
    # during the purge write back (drainbus.drain.refill); at least the origin's response
    # timeout (proxy_read_timeout). 0 turns it off.
    refill_window: Duration = DEFAULT_REFILL_WINDOW
    # Entries each group reads ahead of its work to share it fairly among publishers
    # (drainbus.drain.fair): one user's burst of this many cannot delay another's purge.
    read_ahead: int = Field(20_000, ge=1)
    nginx: tuple[NginxCacheConfig, ...] = ()
    http_purge: tuple[HttpPurgeConfig, ...] = ()
    cloudflare: tuple[CloudflareZoneConfig, ...] = ()

    @field_validator("cloudflare", mode="before")
    @classmethod
    def _one_or_many_zones(cls, value: object) -> object:
        # [drain.cloudflare] (one zone) and [[drain.cloudflare]] (several) both work.
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_scope_rule(self) -> DrainSettings:
        # ScopeRule owns the rules for key_host and owner_separator: ask it, once.
        try:
            ScopeRule(key_host=self.key_host, owner_separator=self.owner_separator)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def scope_rule(self) -> ScopeRule:
        """What a non-admin publisher may purge (see :class:`ScopeRule`)."""
        return ScopeRule(key_host=self.key_host, owner_separator=self.owner_separator)

    @property
    def enabled(self) -> bool:
        """True when this node has any target to drain into."""
        return bool(self.nginx or self.http_purge or self.cloudflare)


_settings_config = SettingsConfigDict(
    env_prefix="DRAINBUS_",
    env_nested_delimiter="__",
    frozen=True,
    extra="forbid",
    nested_model_default_partial_update=True,
)


class Settings(BaseSettings):
    """Everything drainbus is configured with. Built by :func:`load_settings`."""

    model_config = _settings_config

    redis_url: str | None = Field(None, repr=False)  # may hold a password
    # Pooled Redis connections unused this long are closed (0: kept open for good).
    redis_idle_timeout: Duration = 60.0
    data_dir: Path = Path("data")
    # The embedded server's maxmemory in bytes; unset: a quarter of this machine's memory (or of
    # the cgroup's limit). It runs with maxmemory-policy noeviction: full means refused writes.
    embedded_maxmemory: int | None = Field(None, ge=1024 * 1024)
    namespace: str = Field("drainbus", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    server: ServerSettings = ServerSettings()
    topics: TopicSettings = TopicSettings()
    acl: tuple[AclRule, ...] = ()
    drain: DrainSettings = DrainSettings()
    hooks: HooksSettings = HooksSettings()
    http: HttpSettings = HttpSettings()  # the Cloudflare-compatible purge endpoint
    # HOST:PORT for Prometheus; off when unset. Under a supervisor (server.workers > 1) worker
    # K serves on PORT+K (port 0 stays 0: each worker picks a free port).
    metrics_listen: str | None = None

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str | None) -> str | None:
        if value:
            parse_listen(value)
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            parse_url(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _MappingSource(settings_cls, _FILE_DATA.get()))


# load_settings hands the parsed file to settings_customise_sources through this variable:
# pydantic-settings builds its sources from the class, not from the call.
_FILE_DATA: ContextVar[Mapping[str, Any]] = ContextVar(
    "drainbus_config_file", default=MappingProxyType({})
)


class _MappingSource(PydanticBaseSettingsSource):
    """The already parsed TOML file as a settings source."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    """One readable line for one pydantic error: the key, then what is expected.

    The value of a secret field (a ``SecretStr``, or a field with ``repr=False`` such as
    ``redis_url``) is never shown, nor is a value holding a table (it may hold one).
    """
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        hint = f"; known keys here: {', '.join(allowed)}" if allowed else ""
        return f"{location}: unknown setting{hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if _is_secret(model, error["loc"]):
        return f"{location}: {_without_secret(message, value)} (value not shown: it is secret)"
    shown = repr(value)
    # A whole section as input (a check across its keys) would bury the line: leave it out.
    if shown in message or _holds_table(value):
        return f"{location}: {message}"
    return f"{location}: {message} (got {shown})"


def _holds_table(value: object) -> bool:
    if isinstance(value, Mapping):
        return True
    return isinstance(value, list | tuple) and any(_holds_table(item) for item in value)


def _is_secret(model: type[BaseModel], path: tuple[Any, ...]) -> bool:
    """True if ``path`` runs through a secret field (so its value must not be shown)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return False
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        if field.repr is False or SecretStr in (annotation, *args):
            return True
        current = next((a for a in (annotation, *args) if isinstance(a, type)), None)
    return False


def _without_secret(message: str, value: object) -> str:
    """``message`` with ``value`` (and a URL's password) cut out, should a check echo it."""
    if not isinstance(value, str) or not value:
        return message
    if "://" not in value:
        return message.replace(value, "***")
    # A URL: its checks show it redacted, which is useful; cut only what a password could be.
    secrets = re.findall(r"password=([^&]+)", value)
    with contextlib.suppress(ValueError):
        secrets.append(urlsplit(value).password or "")
    secrets = [form for secret in secrets if secret for form in (secret, unquote(secret))]
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


def _allowed_keys(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        current = next((a for a in (annotation, *args) if isinstance(a, type)), None)
    return sorted(getattr(current, "model_fields", {}))


def load_settings(
    config_path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Read the TOML file (if any), the environment and ``overrides`` into :class:`Settings`.

    ``overrides`` holds command-line values, nested like the file (``{"server": {"listen":
    ...}}``); ``None`` values are ignored. Raises :class:`ConfigError` with one line naming
    the first bad key and what it expects.
    """
    file_data = _read_toml(config_path) if config_path else {}
    cleaned = _drop_none(dict(overrides or {}))
    token = _FILE_DATA.set(file_data)
    try:
        return Settings(**cleaned)
    except ValidationError as exc:
        errors = exc.errors()
        origin = f"config file {config_path}: " if config_path else "settings: "
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(origin + _describe(errors[0], Settings) + more) from None
    except SettingsError as exc:
        # An environment value that is not JSON where a list or table is expected.
        raise ConfigError(
            f"environment: {exc}: {exc.__cause__} (lists and tables are JSON, "
            f"for example DRAINBUS_SERVER__ADMINS='[\"alice\"]')"
        ) from None
    finally:
        _FILE_DATA.reset(token)


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        kept = _drop_none(value) if isinstance(value, dict) else value
        if kept is not None and kept != {}:
            out[key] = kept
    return out
