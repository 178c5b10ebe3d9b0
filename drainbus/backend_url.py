"""Redis URLs taken apart: one server, Redis Cluster or Sentinel, with or without TLS.

A leaf module (it imports only :mod:`drainbus.errors`), so the settings can check a URL when
they load without importing the Redis clients of :mod:`drainbus.bus.connection`.

Forms (:func:`parse_url`)::

    redis://[user:pass@]host[:port][/db]         one server, read by redis-py itself
    rediss://…                                   (TLS), unix://[user:pass@]/path/to/socket
    redis+cluster://[user:pass@]host:port[,host:port…][?options]
        Redis Cluster. The hosts are where to start: the client learns every node from them.
    redis+sentinel://[user:pass@]host:port[,host:port…]/SERVICE[/db][?options]
        The primary the sentinels at host:port… (default port 26379) name for SERVICE.
    rediss+cluster://…, rediss+sentinel://…     the same over TLS (to the sentinels too)

``user:pass`` logs in to the data nodes. Sentinels are asked without a password, unless
``?sentinel_password=`` (and ``sentinel_username=``) gives them one of their own: they
rarely share the data nodes' password. Other options, for ``rediss+`` only: ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none``, ``optional``, ``required``).
Percent-encode special characters in names and passwords.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

from drainbus.errors import ConfigError

__all__ = ["BackendUrl", "Kind", "parse_url", "redacted_url"]

Kind: TypeAlias = Literal["single", "cluster", "sentinel"]

_SCHEMES: dict[str, tuple[Kind, bool]] = {  # scheme -> kind, TLS
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = ("none", "optional", "required")
_PASSWORD_OPTION = re.compile(r"([?&][^=&#]*password=)[^&#]*")


@dataclass(frozen=True, slots=True)
class BackendUrl:
    """A Redis URL taken apart. A ``single`` one is kept whole: redis-py reads it itself."""

    kind: Kind
    url: str = field(repr=False)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    node_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """Client arguments for the data nodes: username, password, db, ssl, ssl_*."""
    sentinel_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """Client arguments for the sentinels: username and password if given, ssl, ssl_*."""


def parse_url(url: str) -> BackendUrl:
    """Take ``url`` apart (forms: the module docstring).

    Raises ConfigError saying what is wrong; the message shows the URL without passwords.
    """
    kind, tls = _SCHEMES.get(url.partition("://")[0] if "://" in url else "", (None, False))
    if kind is None:
        raise ConfigError(
            f"{redacted_url(url)!r} is not a Redis URL: use redis://, rediss:// or unix:// "
            "for one server, redis+cluster://HOST:PORT,… for a cluster, or "
            "redis+sentinel://HOST:PORT,…/SERVICE for Sentinel (rediss+… for TLS)"
        )
    if kind == "single":
        return BackendUrl("single", url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _invalid(url, str(exc)) from None
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    hosts = tuple(_address(url, text, _DEFAULT_PORT[kind]) for text in hostlist.split(","))
    options = _query_options(url, parts.query, kind, tls)
    sentinel_login = {
        name.removeprefix("sentinel_"): options.pop(name)
        for name in _SENTINEL_OPTIONS
        if name in options
    }
    node_options: dict[str, Any] = {**_login(userinfo), "ssl": tls, **options}
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    if kind == "cluster":
        if path not in ([], ["0"]):
            raise _invalid(url, "a cluster has only database 0: leave out the path")
        return BackendUrl("cluster", url, hosts, node_options=node_options)
    if len(path) not in (1, 2):
        raise _invalid(url, "name the service: redis+sentinel://HOST:PORT,…/SERVICE[/DB]")
    if len(path) == 2:
        node_options["db"] = _number(url, path[1], "database", 0, 2**31 - 1)
    tls_options = {name: value for name, value in node_options.items() if name.startswith("ssl")}
    return BackendUrl(
        "sentinel",
        url,
        hosts,
        service=path[0],
        node_options=node_options,
        sentinel_options={**sentinel_login, **tls_options},
    )


def _address(url: str, text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[ipv6][:port]`` -> (host, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        if port and not port.startswith(":"):
            raise _invalid(url, f"{text!r} is not [IPV6]:PORT")
        port = port[1:]
    else:
        host, _, port = text.partition(":")
    if not host:
        raise _invalid(url, f"a host is missing in {text!r}: give HOST:PORT[,HOST:PORT…]")
    return host, _number(url, port, "port", 1, 65535) if port else default_port


def _number(url: str, text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise _invalid(url, f"{what} {text!r} is not a number from {low} to {high}")
    return int(text)


def _login(userinfo: str) -> dict[str, str]:
    """``user:password`` (either may be empty) -> the client arguments it sets."""
    user, _, password = userinfo.partition(":")
    login = {"username": unquote(user), "password": unquote(password)}
    return {name: value for name, value in login.items() if value}


def _query_options(url: str, query: str, kind: Kind, tls: bool) -> dict[str, str]:
    allowed = (_SENTINEL_OPTIONS if kind == "sentinel" else ()) + (_TLS_OPTIONS if tls else ())
    options = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _TLS_OPTIONS and not tls:
            raise _invalid(url, f"{name} is for TLS: use rediss+{kind}://")
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no options"
            raise _invalid(url, f"unknown option {name!r} (this URL takes {takes})")
        options[name] = value
    if options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise _invalid(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    return options


def _invalid(url: str, problem: str) -> ConfigError:
    return ConfigError(f"Redis URL {redacted_url(url)!r} is invalid: {problem}")


def redacted_url(url: str) -> str:
    """``url`` without its passwords (user info, ``…password=`` options), for logs and errors."""
    scheme, sep, rest = url.partition("://")
    address, query_mark, query = rest.partition("?")
    if "@" in address:  # the last "@" ends the user info, whatever the password holds
        address = "***@" + address.rpartition("@")[2]
    return scheme + sep + address + _PASSWORD_OPTION.sub(r"\1***", query_mark + query)
