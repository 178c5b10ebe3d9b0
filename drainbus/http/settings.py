"""``[http]``: the Cloudflare-compatible purge endpoint (off unless ``listen`` is set).

In the config file::

    [http]
    listen = "127.0.0.1:8452"          # unset: no HTTP endpoint
    zones = ["023e105f4ecef8ad9ca31a8372d0c353"]   # zone ids accepted besides [drain.cloudflare]'s
    allow_insecure_http = false        # plain HTTP on a non-loopback address
    tls_cert = "/etc/drainbus/tls.crt" # both set: HTTPS
    tls_key = "/etc/drainbus/tls.key"

Bearer tokens travel in every request, so plain HTTP is served only on a loopback address
(a proxy on the same machine terminating TLS, as the README shows) unless TLS files are given
or ``allow_insecure_http`` says the network is trusted. This module imports nothing from
:mod:`drainbus.config`, so that module can import it.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from drainbus.values import parse_listen

__all__ = ["HttpSettings", "is_loopback"]

_ZONE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # one path segment, as Cloudflare's 32 hex digits


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class HttpSettings(BaseModel):
    """Where the purge endpoint listens, which zone ids it answers for, and its TLS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: str | None = None
    zones: tuple[str, ...] = ()
    allow_insecure_http: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value:
            parse_listen(value)
        return value or None

    @field_validator("zones")
    @classmethod
    def _check_zones(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for zone in value:
            if not _ZONE_ID.fullmatch(zone):
                raise ValueError(f"{zone!r} is not a zone id: letters, digits, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _check_transport(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both for HTTPS, or neither")
        if self.listen and not self.tls and not self.allow_insecure_http:
            host, _ = parse_listen(self.listen)
            if not is_loopback(host):
                raise ValueError(
                    f"listen = {self.listen!r} would send tokens in plain HTTP off this machine;"
                    " listen on 127.0.0.1 behind a TLS proxy, set tls_cert and tls_key, or set"
                    " allow_insecure_http = true"
                )
        return self

    @property
    def tls(self) -> bool:
        """True when the endpoint serves HTTPS."""
        return self.tls_cert is not None

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """``listen`` as (host, port), or None when the endpoint is off."""
        return parse_listen(self.listen) if self.listen else None
