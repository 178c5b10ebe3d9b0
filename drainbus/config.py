"""One typed, frozen settings object, loaded and validated once at start-up.

Sources, strongest first: command-line flags, the environment, the TOML config file, the
defaults below. Every setting can come from the environment as ``DRAINBUS_<NAME>``, with
``__`` between a section and its key: ``DRAINBUS_REDIS_URL``, ``DRAINBUS_SERVER__LISTEN``,
``DRAINBUS_SERVER__ADMINS='["alice"]'`` (lists and tables as JSON). A systemd unit therefore
needs nothing but an ``EnvironmentFile``.

Relative paths are taken from the working directory drainbus starts in.
"""

from __future__ import annotations

import os
import socket
import sys
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from drainbus.drain.cloudflare import CloudflareZoneConfig
from drainbus.drain.http_purge import HttpPurgeConfig
from drainbus.drain.nginx import NginxCacheConfig
from drainbus.drain.purges import ScopeRule
from drainbus.drain.refill import DEFAULT_REFILL_WINDOW
from drainbus.errors import ConfigError
from drainbus.hooks.settings import HooksSettings
from drainbus.values import Duration, parse_duration, parse_listen

__all__ = [
    "AclRule",
    "DrainSettings",
    "ServerSettings",
    "Settings",
    "TopicSettings",
    "load_settings",
    "parse_duration",
    "parse_listen",
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    """The SSH front door: where it listens, who may log in, and its limits.

    With ``workers`` above 1 every worker process enforces the limits on its own, so
    ``max_connections`` and ``max_sessions_per_user`` apply per worker.
    """

    listen: str = "0.0.0.0:2222"
    # Processes sharing the port (SO_REUSEPORT), each a node of the bus, under one supervisor;
    # 0: one per CPU this process may run on; 1: one process and no supervisor.
    workers: int = Field(0, ge=0)
    host_keys_dir: Path = Path("keys/host")
    users_dir: Path = Path("keys/users")
    admins: tuple[str, ...] = ()
    max_connections: int = Field(1000, ge=1)
    max_sessions_per_user: int = Field(64, ge=1)
    login_timeout: Duration = 5.0
    keepalive_interval: Duration = 15.0
    keepalive_count_max: int = Field(3, ge=1)
    max_message_bytes: int = Field(65536, ge=1, le=64 * 1024 * 1024)
    subscriber_buffer_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    users_reload_interval: Duration = 2.0
    shutdown_grace: Duration = 5.0

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

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
    """How much history each topic's stream keeps."""

    max_len: int = Field(100_000, ge=1)
    retention: Duration = 7 * 86400.0


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
    retry_after: Duration = 10.0
    # How long after a purge the nginx targets evict stale copies that requests in flight
    # during the purge write back (drainbus.drain.refill); at least the origin's response
    # timeout (proxy_read_timeout). 0 turns it off.
    refill_window: Duration = DEFAULT_REFILL_WINDOW
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
    data_dir: Path = Path("data")
    namespace: str = Field("drainbus", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    server: ServerSettings = ServerSettings()
    topics: TopicSettings = TopicSettings()
    acl: tuple[AclRule, ...] = ()
    drain: DrainSettings = DrainSettings()
    hooks: HooksSettings = HooksSettings()
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
        # Imported here because drainbus.bus imports this module.
        from drainbus.bus.connection import parse_url  # noqa: PLC0415

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
    """One readable line for one pydantic error: the key, then what is expected."""
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        hint = f"; known keys here: {', '.join(allowed)}" if allowed else ""
        return f"{location}: unknown setting{hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    shown = repr(value)
    # A whole section as input (a check across its keys) would bury the line: leave it out.
    if shown in message or isinstance(value, dict):
        return f"{location}: {message}"
    return f"{location}: {message} (got {shown})"


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
