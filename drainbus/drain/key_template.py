"""nginx ``proxy_cache_key`` templates: render the key of a URL, and read a key back.

A template is what ``proxy_cache_key`` says, e.g. ``$scheme$host$request_uri``. Rendering it
for a URL gives the key nginx computes for a request of that URL (and so the cache file's
name, the MD5 of the key). Running it backwards over a key gives every (host, path, query)
the key may stand for: ``$scheme$host`` is ambiguous (``httpshop.example`` is ``http`` +
``shop.example`` or ``https`` + ``hop.example``), so a key can have several readings. A
template without ``$host`` (nginx's default key) makes one object serve every host.
"""

from __future__ import annotations

import re
import sys
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

__all__ = [
    "SUPPORTED_VARIABLES",
    "KeyParts",
    "KeyTemplate",
    "Reading",
    "template_variables",
    "url_parts",
]

#: The variables a key template may use.
SUPPORTED_VARIABLES = ("scheme", "host", "proxy_host", "request_uri", "uri", "is_args", "args")

_VARIABLE = re.compile(r"\$(?:\{([A-Za-z0-9_]*)\}|([A-Za-z0-9_]*))")
_CAPTURE = {
    "host": r"[^/?\s]*",
    "request_uri": r"/\S*",
    "uri": r"/[^?]*",
    "is_args": r"\??",
    "args": r".*?",
}


def template_variables(template: str) -> tuple[str, ...]:
    """The variables ``template`` uses, in order; ``ValueError`` names any unsupported one."""
    names = [braced or bare for braced, bare in _VARIABLE.findall(template)]
    unknown = sorted({name for name in names if name not in SUPPORTED_VARIABLES})
    if unknown:
        shown = ", ".join(f"${name}" if name else "a bare '$'" for name in unknown)
        supported = ", ".join(f"${name}" for name in SUPPORTED_VARIABLES)
        raise ValueError(
            f"key template {template!r} uses unsupported variables {shown}: use only {supported}"
        )
    return tuple(names)


class KeyParts(NamedTuple):
    """What a cache key (or a URL) says about its object.

    ``host`` is lower-case, or None when the key does not carry the host; ``path`` is
    percent-decoded without the query, or None when the key does not carry it; ``query`` is
    the raw query string, None when absent or empty.
    """

    host: str | None
    path: str | None
    query: str | None


def _nginx_host(netloc: str) -> str:
    # nginx's $host: the Host name lower-cased, without port or trailing dot.
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        host = hostport[: hostport.find("]") + 1]
    else:
        host = hostport.partition(":")[0]
    return host.lower().rstrip(".")


def _url_variables(url: str) -> dict[str, str]:
    split = urlsplit(url)
    path = split.path or "/"
    has_query = "?" in url.partition("#")[0]
    return {
        "scheme": split.scheme.lower(),
        "host": _nginx_host(split.netloc),
        "request_uri": f"{path}?{split.query}" if has_query else path,
        "uri": unquote(path),
        "args": split.query,
        "is_args": "?" if split.query else "",
    }


def url_parts(url: str) -> KeyParts:
    """Host, decoded path and query of an absolute URL, normalised as index entries are."""
    values = _url_variables(url)
    return KeyParts(values["host"], values["uri"], values["args"] or None)


#: A KeyParts as a plain tuple, (host, path, query): the form the index keeps.
Reading = tuple[str | None, str | None, str | None]


class KeyTemplate:
    """An nginx ``proxy_cache_key`` template: renders keys for URLs and reads keys back.

    Raises ``ValueError`` for unsupported variables, or for ``$proxy_host`` without a
    ``proxy_host`` value.
    """

    def __init__(self, template: str, proxy_host: str | None = None) -> None:
        names = template_variables(template)
        if "proxy_host" in names and proxy_host is None:
            raise ValueError(
                f"key template {template!r} uses $proxy_host: set proxy_host to the host[:port] "
                "written in proxy_pass (e.g. 'origin:8080')"
            )
        self.template = template
        self.proxy_host = proxy_host
        self.variables = frozenset(names)
        #: Whether the key tells objects of different hosts / queries apart.
        self.has_host = "host" in self.variables
        self.has_query = bool(self.variables & {"request_uri", "args"})
        self._patterns = tuple(self._pattern(scheme) for scheme in ("https", "http"))

    def __repr__(self) -> str:
        return f"KeyTemplate({self.template!r}, proxy_host={self.proxy_host!r})"

    def render(self, url: str) -> str:
        """The cache key nginx computes for a request of ``url`` (an absolute URL)."""
        values = _url_variables(url)
        values["proxy_host"] = self.proxy_host or ""
        return _VARIABLE.sub(lambda m: values[m[1] or m[2]], self.template)

    def _pattern(self, scheme: str) -> re.Pattern[str]:
        pattern, seen, last = [], set(), 0
        for match in _VARIABLE.finditer(self.template):
            pattern.append(re.escape(self.template[last : match.start()]))
            last = match.end()
            name = match[1] or match[2]
            if name == "scheme":
                pattern.append(scheme)
            elif name == "proxy_host":
                pattern.append(re.escape(self.proxy_host or ""))
            elif name in seen:
                pattern.append(f"(?P={name})")
            else:
                seen.add(name)
                pattern.append(f"(?P<{name}>{_CAPTURE[name]})")
        pattern.append(re.escape(self.template[last:]))
        return re.compile("".join(pattern), re.DOTALL)

    def invert(self, key: str) -> tuple[KeyParts, ...]:
        """Every (host, path, query) reading of ``key``; empty if the template cannot match."""
        return tuple(KeyParts(*reading) for reading in self.readings(key))

    def readings(self, key: str) -> tuple[Reading, ...]:
        """:meth:`invert` as plain tuples, the form the index keeps."""
        readings: list[Reading] = []
        for pattern in self._patterns:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            groups = match.groupdict()
            # Interned, like tags: a host is shared by every file of its site.
            host = sys.intern(groups["host"].lower()) if "host" in groups else None
            if "request_uri" in groups:
                path, _, query = groups["request_uri"].partition("?")
                parts: Reading = (host, unquote(path), query or None)
            elif "uri" in groups:
                parts = (host, groups["uri"], groups.get("args") or None)
            else:
                parts = (host, None, None)
            if parts not in readings:
                readings.append(parts)
        return tuple(readings)
