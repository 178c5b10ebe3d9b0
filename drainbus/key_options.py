"""The options before a key in an authorized_keys line, read and enforced as OpenSSH does.

drainbus enforces what restricts *who may log in*: ``from="PATTERNS"`` (the client's address
must match: ``*`` and ``?`` wildcards, CIDR networks, ``!`` negations, which win) and
``expiry-time="YYYYMMDD[HHMM[SS]][Z]"`` (local time, or UTC with ``Z``; the key is refused
after it). Names are never looked up, like OpenSSH's default ``UseDNS no``: a pattern is
matched against the address only.

``restrict`` and the ``no-*`` options already hold (drainbus grants no PTY, forwarding, agent
or X11, and runs no rc file), as do the grants that only undo them (``pty``, …: drainbus
grants none of it anyway), ``environment=`` (no shell, no environment) and ``touch-required``
(asyncssh requires a security key's touch; ``no-touch-required`` is not honoured, so a touch
stays required).

A line is refused, and gives no login, for an option drainbus cannot honour: ``command=``
(drainbus runs only its own commands), ``permitopen=``, ``permitlisten=``, ``tunnel=``
(drainbus forwards nothing), ``cert-authority`` and ``principals=`` (no user certificates
yet: a CA key must not become a login key), ``verify-required`` (asyncssh cannot check a
security key's PIN); and, as OpenSSH does, for an unknown or malformed option.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["KeyOptionError", "KeyOptions", "parse_key_options"]

# Options that hold without drainbus doing anything (see the module docstring).
_HOLD = frozenset(
    {
        "restrict",
        "no-agent-forwarding",
        "no-port-forwarding",
        "no-pty",
        "no-user-rc",
        "no-x11-forwarding",
        "agent-forwarding",
        "port-forwarding",
        "pty",
        "user-rc",
        "x11-forwarding",
        "touch-required",
        "no-touch-required",
    }
)
_REFUSED = {
    "command": "a forced command: drainbus runs only its own commands (pub, sub, ...)",
    "permitopen": "drainbus forwards no ports",
    "permitlisten": "drainbus forwards no ports",
    "tunnel": "drainbus forwards no tunnels",
    "cert-authority": "user certificates are not supported (yet): a CA key is no login key",
    "principals": "principals= applies to user certificates, which are not supported (yet)",
    "verify-required": "a security key's PIN verification cannot be checked",
}
_WITH_VALUE = frozenset({"from", "expiry-time", "environment", *_REFUSED} - {"cert-authority"})
_NAME = re.compile(r"[A-Za-z0-9-]+")
_EXPIRY = re.compile(r"(\d{8}|\d{12}|\d{14})([Zz]?)")


class KeyOptionError(ValueError):
    """An option drainbus refuses or cannot read; the message says which and why."""


@dataclass(frozen=True, slots=True)
class _AddressPattern:
    negated: bool
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    wildcard: re.Pattern[str] | None

    def matches(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.network is not None and address in self.network:
            return True
        return self.wildcard is not None and self.wildcard.fullmatch(str(address)) is not None


@dataclass(frozen=True, slots=True)
class KeyOptions:
    """What a key line's options require of a login: ``from=`` patterns, an expiry time."""

    from_patterns: str | None = None
    expires: float | None = None  # seconds since the epoch; refused once past
    _patterns: tuple[_AddressPattern, ...] = ()

    def refusal(self, address: str, now: float | None = None) -> str | None:
        """Why a login from ``address`` (an IP address) at ``now`` is refused; None if not."""
        now = time.time() if now is None else now
        if self.expires is not None and self.expires < now:
            moment = datetime.fromtimestamp(self.expires, UTC).isoformat()
            return f"the key expired at {moment} (expiry-time)"
        if self.from_patterns is not None and not self._from_allows(address):
            return f'{address} is not in from="{self.from_patterns}"'
        return None

    def _from_allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket's IPv4 client, as OpenSSH sees it
        allowed = False
        for pattern in self._patterns:
            if pattern.matches(ip):
                if pattern.negated:
                    return False
                allowed = True
        return allowed


def parse_key_options(line: str) -> tuple[KeyOptions, str]:
    """Read the options that start a key line; return them and the rest of the line (the key).

    Raises KeyOptionError for an option drainbus refuses, an unknown or repeated option, or
    one it cannot read (OpenSSH's grammar: names in any case, comma-separated, values in
    double quotes with ``\\"`` for a quote, the first space or tab outside quotes ends them).
    """
    from_patterns: str | None = None
    expires: float | None = None
    options, rest = _split(line)
    for name, value in options:
        if name in _REFUSED:
            raise KeyOptionError(f"option {name} is not supported: {_REFUSED[name]}")
        if name not in _HOLD and name not in _WITH_VALUE:
            raise KeyOptionError(f"unknown option {name!r}")
        if (value is None) != (name not in _WITH_VALUE):
            form = f'{name}="..."' if name in _WITH_VALUE else name
            raise KeyOptionError(f"option {name} is written {form}")
        if name == "from":
            if from_patterns is not None:
                raise KeyOptionError("option from= is given twice; list every pattern in one")
            from_patterns = value
        elif name == "expiry-time":
            if expires is not None:
                raise KeyOptionError("option expiry-time= is given twice")
            expires = _expiry(value or "")
    patterns = _address_patterns(from_patterns) if from_patterns is not None else ()
    return KeyOptions(from_patterns, expires, patterns), rest


def _split(text: str) -> tuple[list[tuple[str, str | None]], str]:
    """``name`` or ``name="value"`` options, comma-separated, as OpenSSH reads them; and
    what follows them."""
    options: list[tuple[str, str | None]] = []
    at = 0
    while True:
        found = _NAME.match(text, at)
        if found is None:
            raise KeyOptionError(f"cannot read the options at column {at + 1}: {text[at:]!r}")
        name, at = found[0].lower(), found.end()
        value: str | None = None
        if text.startswith("=", at):
            if not text.startswith('"', at + 1):
                raise KeyOptionError(f'option {name}= needs a quoted value: {name}="..."')
            chars, at = [], at + 2
            while not text.startswith('"', at):
                if at >= len(text):
                    raise KeyOptionError(f"option {name}= has no closing quote")
                if text.startswith('\\"', at):
                    at += 1
                chars.append(text[at])
                at += 1
            value, at = "".join(chars), at + 1
        options.append((name, value))
        if at == len(text) or text[at] in " \t":
            return options, text[at:].strip()
        if text[at] != ",":
            raise KeyOptionError(f"unexpected {text[at]!r} after option {name}")
        at += 1


def _address_patterns(value: str) -> tuple[_AddressPattern, ...]:
    patterns = []
    for item in value.split(","):
        negated = item.startswith("!")
        pattern = item[1:] if negated else item
        if not pattern:
            raise KeyOptionError(f'from="{value}" has an empty pattern')
        network = None
        try:
            network = ipaddress.ip_network(pattern)
        except ValueError:
            if "/" in pattern:
                raise KeyOptionError(
                    f"from= pattern {pattern!r} is not a network (ADDRESS/BITS, with the host "
                    "bits zero)"
                ) from None
        wildcard = None
        if network is None:
            regex = "".join(
                ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
            )
            wildcard = re.compile(regex, re.IGNORECASE)
        patterns.append(_AddressPattern(negated, network, wildcard))
    return tuple(patterns)


def _expiry(value: str) -> float:
    """expiry-time as OpenSSH's parse_absolute_time: local time, or UTC with a Z."""
    found = _EXPIRY.fullmatch(value)
    if found is None:
        raise KeyOptionError(
            f'expiry-time="{value}" is not YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS '
            "(local time; a final Z for UTC)"
        )
    digits = found[1].ljust(14, "0")
    try:
        moment = datetime.strptime(digits, "%Y%m%d%H%M%S")  # local time, as OpenSSH
    except ValueError:
        raise KeyOptionError(f'expiry-time="{value}" is not a valid date and time') from None
    return (moment.replace(tzinfo=UTC) if found[2] else moment).timestamp()
