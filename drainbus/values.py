"""Value types every settings model shares: durations and listen addresses.

A leaf module (it imports nothing of drainbus), so every component's settings model can use
the same forms: ``timeout = "2s"`` is read alike in ``[server]``, ``[drain.cloudflare]``,
``[[drain.http_purge]]`` and ``[hooks]``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

__all__ = ["Durability", "Duration", "PositiveDuration", "parse_duration", "parse_listen"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Return seconds for ``30``, ``1.5``, ``"250ms"``, ``"30s"``, ``"10m"``, ``"2h"``, ``"7d"``.

    Raises ValueError naming the accepted forms.
    """
    if isinstance(value, bool):
        # ValueError, not TypeError: pydantic reports only ValueError as a validation error.
        raise ValueError("expected a duration such as 30s, 10m, 2h or 7d")  # noqa: TRY004
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration: use a number with ms, s, m, h or d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
"""Seconds, from a number or a string such as ``"500ms"``, ``"30s"`` or ``"2h"``; 0 allowed."""

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
"""A :data:`Duration` that must be above 0 (a timeout)."""

Durability = Literal["os", "fsync", "replica"]
"""How durable ``pub`` makes a topic's messages (see :mod:`drainbus.bus.persistence`)."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:2222`` for IPv6) into host and port.

    Raises ValueError when the port is missing or outside 0-65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (for example 0.0.0.0:2222 or [::1]:2222)")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - listening on all is the default
