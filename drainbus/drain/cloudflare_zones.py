"""A Cloudflare zone's settings, and the purge limits of each Cloudflare plan.

``[drain.cloudflare]`` (one zone) or ``[[drain.cloudflare]]`` (several) is read into
:class:`CloudflareZoneConfig`; :data:`PLAN_LIMITS` gives the rate limits and call sizes
the forwarder (:mod:`drainbus.drain.cloudflare`) paces and packs its calls by.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from drainbus.errors import ConfigError
from drainbus.values import Duration, PositiveDuration

__all__ = [
    "PLAN_LIMITS",
    "PLAN_ORDER",
    "TOKEN_ENV",
    "CloudflareZoneConfig",
    "Plan",
    "PlanLimits",
    "ZoneConfigError",
    "normalise_host",
]

Plan = Literal["free", "pro", "business", "enterprise"]
PLAN_ORDER: Final[tuple[Plan, ...]] = ("free", "pro", "business", "enterprise")
TOKEN_ENV: Final = "CLOUDFLARE_API_TOKEN"  # noqa: S105 - the variable's name, not a secret


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """Cloudflare's purge limits for one plan, applied per account.

    ``calls_per_second`` and ``calls_bucket``: tag/host/prefix/everything calls.
    ``urls_per_second``: URLs purged per second (the bucket holds one second's worth).
    ``items_per_call`` and ``files_per_call``: most items in one call.
    """

    calls_per_second: float
    calls_bucket: float
    urls_per_second: float
    items_per_call: int = 100
    files_per_call: int = 100


PLAN_LIMITS: Final[Mapping[Plan, PlanLimits]] = {
    "free": PlanLimits(calls_per_second=5 / 60, calls_bucket=25, urls_per_second=800),
    "pro": PlanLimits(calls_per_second=5, calls_bucket=25, urls_per_second=1500),
    "business": PlanLimits(calls_per_second=10, calls_bucket=50, urls_per_second=1500),
    "enterprise": PlanLimits(
        calls_per_second=50, calls_bucket=500, urls_per_second=3000, files_per_call=500
    ),
}


class ZoneConfigError(ConfigError):
    """A Cloudflare zone's settings cannot be used; ``zone`` is the zone id."""

    def __init__(self, message: str, *, zone: str) -> None:
        super().__init__(message)
        self.zone = zone


_ZONE_ID = re.compile(r"[A-Za-z0-9_-]+")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")


def normalise_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


class CloudflareZoneConfig(BaseModel):
    """One Cloudflare zone drainbus purges, and how.

    ``hosts`` are the host names the zone serves (``*.example.com`` matches any subdomain of
    example.com, not example.com itself); an empty list makes the zone a catch-all for URL,
    host and prefix purges no other zone claims. Zones with the same ``account`` share one
    rate-limit budget; with ``account`` unset, zones share it when they share a token.
    ``batch_window`` and ``timeout`` are seconds. ``batch_window`` is the longest the daemon
    holds purges back to gather more while the rate limit leaves no room for a call; an idle
    bus never waits for it (see :meth:`CloudflareForwarder.busy_for`). 0, the default, never
    holds back: purges that arrive while a call is in flight or waits for the rate limit
    are coalesced into the next call all the same.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    zone_id: str
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    hosts: list[str] = Field(default_factory=list)
    plan: Plan = "free"
    api_base: str = "https://api.cloudflare.com/client/v4"
    mode: Literal["purge", "invalidate"] = "purge"
    batch_window: Duration = 0.0
    timeout: PositiveDuration = 10.0
    account: str | None = None

    @field_validator("zone_id")
    @classmethod
    def _check_zone_id(cls, value: str) -> str:
        if not _ZONE_ID.fullmatch(value):
            raise ValueError("zone_id must be the zone's id: letters, digits, '_' and '-'")
        return value

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        hosts = []
        for raw in value:
            host = normalise_host(raw)
            labels = host.removeprefix("*.").split(".")
            if not host or not all(_HOST_LABEL.fullmatch(label) for label in labels):
                raise ValueError(
                    f"host {raw!r} is invalid: use a host name like 'www.example.com' or"
                    " '*.example.com' (no scheme, port or path; IDNs in punycode)"
                )
            hosts.append(host)
        return hosts

    @field_validator("api_base")
    @classmethod
    def _check_api_base(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"api_base {value!r} must be an http(s) URL")
        return value.rstrip("/")

    def resolve_token(self, environ: Mapping[str, str] | None = None) -> SecretStr:
        """The API token: ``api_token``, else ``api_token_file`` (stripped), else the
        ``CLOUDFLARE_API_TOKEN`` environment variable.

        Raises :class:`ZoneConfigError` naming the zone when none is set, the file cannot be
        read, or the token is empty.
        """
        zone = self.zone_id
        if self.api_token is not None:
            token = self.api_token.get_secret_value().strip()
            source = "api_token"
        elif self.api_token_file is not None:
            try:
                token = self.api_token_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ZoneConfigError(
                    f"zone {zone}: cannot read api_token_file {self.api_token_file}: {reason}",
                    zone=zone,
                ) from None
            source = f"api_token_file {self.api_token_file}"
        else:
            env = os.environ if environ is None else environ
            token = env.get(TOKEN_ENV, "").strip()
            if not token:
                raise ZoneConfigError(
                    f"zone {zone} has no Cloudflare API token: set api_token or"
                    f" api_token_file for the zone, or {TOKEN_ENV} in the environment",
                    zone=zone,
                )
            source = TOKEN_ENV
        if not token:
            raise ZoneConfigError(f"zone {zone}: {source} is empty", zone=zone)
        return SecretStr(token)
