"""nginx ``proxy_cache_key`` templates: render the key of a URL, and read a key back.

A template is what ``proxy_cache_key`` says, e.g. ``$scheme$host$request_uri``. Rendering it
for a URL gives the key nginx computes for a request of that URL (and so the cache file's
name, the MD5 of the key). Running it backwards over a key gives every (host, path, query)
the key may stand for: ``$scheme$host`` is ambiguous (``httpshop.example`` is ``http`` +
``shop.example`` or ``https`` + ``hop.example``), so a key can have several readings. A
template without ``$host`` (nginx's default key) makes one object serve every host.

nginx's default key (no ``proxy_cache_key``) is not the ``$scheme$proxy_host$request_uri``
its documentation prints: nginx 1.22 writes ``http://127.0.0.1:8080/docs/x?q=1``, the
``proxy_pass`` URL's scheme, ``://``, ``$proxy_host``, then the request URI; the client's
scheme and Host do not enter it. :meth:`KeyTemplate.nginx_default` is that key.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import NamedTuple, TypeVar
from urllib.parse import unquote

from drainbus.drain.url_rules import path_under, split_url

__all__ = [
    "SUPPORTED_VARIABLES",
    "KeyParts",
    "KeyTemplate",
    "Reading",
    "forget_urls",
    "host_reading_matches",
    "is_request_variable",
    "prefix_reading_matches",
    "proxy_host_of",
    "template_variables",
    "url_parts",
    "url_reading_matches",
]

#: The variables a key template may use.
SUPPORTED_VARIABLES = ("scheme", "host", "proxy_host", "request_uri", "uri", "is_args", "args")

_VARIABLE = re.compile(r"\$(?:\{([A-Za-z0-9_]*)\}|([A-Za-z0-9_]*))")
_CAPTURE = {
    # nginx's $host never carries a port: a ':' outside [IPv6] brackets is not part of it
    # (else $scheme$host would read "http://backend:8080/p" as host ":").
    "host": r"(?:\[[^\]/\s]*\]|[^/?:\s\[\]]*)",
    "request_uri": r"/\S*",
    "uri": r"/[^?]*",
    "is_args": r"\??",
    "args": r".*?",
}
# An unknown $proxy_host: any host[:port], up to the first '/'.
_ANY_PROXY_HOST = r"[^/\s]+"
_T = TypeVar("_T")
_URL_MEMO = 4096  # URLs whose parts and key are remembered (a few batches' worth)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# URLs whose keys show an ambiguous template: hosts that are another host with a scheme's
# tail in front ("s" + "hop.example"), over both schemes.
_AMBIGUITY_PROBES = tuple(
    f"{scheme}://{host}/x?a=1"
    for host in ("shop.example", "hop.example", "s.example")
    for scheme in ("http", "https")
)
_HOST_PORT = re.compile(r"(\[[^\]\s]*\]|[^:\[\]\s]+)(?::([0-9]+))?")


#: Variables of the request whose values a purge does not know: any ``$http_NAME`` (a request
#: header), ``$cookie_NAME`` and ``$arg_NAME``. A key using them is never rendered; its
#: files are found through the index, and a URL purge evicts every variant of the URL.
REQUEST_VARIABLE = re.compile(r"(?:http|cookie|arg)_[A-Za-z0-9_]+")


def is_request_variable(name: str) -> bool:
    """Whether ``$name`` is a request header, cookie or argument (see
    :data:`REQUEST_VARIABLE`)."""
    return REQUEST_VARIABLE.fullmatch(name) is not None


def template_variables(template: str) -> tuple[str, ...]:
    """The variables ``template`` uses, in order; ``ValueError`` names any unsupported one."""
    names = [braced or bare for braced, bare in _VARIABLE.findall(template)]
    unknown = sorted(
        {
            name
            for name in names
            if name not in SUPPORTED_VARIABLES and not is_request_variable(name)
        }
    )
    if unknown:
        shown = ", ".join(f"${name}" if name else "a bare '$'" for name in unknown)
        supported = ", ".join(f"${name}" for name in SUPPORTED_VARIABLES)
        raise ValueError(
            f"key template {template!r} uses unsupported variables {shown}: use only {supported}"
            ", $http_NAME, $cookie_NAME and $arg_NAME"
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
        # find or rfind: the same for a valid bracketed host, which has one ']'.
        host = hostport[: hostport.find("]") + 1]
    else:
        host = hostport.partition(":")[0]
    return host.lower().rstrip(".")  # (lower case first: no 'X' for rstrip("X.X") to strip)


def _split_variables(url: str) -> dict[str, str]:
    split = split_url(url)
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


# A URL purge needs its URL's variables up to four times (its key, the key check, the index,
# the refill window) within one batch: split once, remembered for the last few thousand URLs.
# The dict is shared by every caller: read it, never change it. Wrapped here rather than
# decorated: mutmut (scripts/mutate) skips decorated functions.
_url_variables = functools.lru_cache(maxsize=_URL_MEMO)(_split_variables)


def proxy_host_of(proxy_pass: str) -> tuple[str, str]:
    """The upstream scheme and ``$proxy_host`` of a ``proxy_pass`` URL without a URI part.

    ``$proxy_host`` is the host as written, with the port unless it is the scheme's default
    (nginx 1.22 keys ``proxy_pass http://127.0.0.1:80`` as ``http://127.0.0.1/…``).
    Raises ``ValueError`` naming what is wrong: not http(s), variables, or a URI part (nginx
    then keys the rewritten upstream URI, which no template here describes).
    """
    scheme, sep, rest = proxy_pass.partition("://")
    scheme = scheme.lower()
    hostport, slash, _ = rest.partition("/")
    expected = "expected the URL written in nginx's proxy_pass, e.g. 'http://127.0.0.1:8080'"
    if not sep or scheme not in _DEFAULT_PORTS or "$" in proxy_pass:
        raise ValueError(f"proxy_pass {proxy_pass!r} is not an http(s) URL: {expected}")
    if slash or "?" in hostport or "#" in hostport:
        raise ValueError(
            f"proxy_pass {proxy_pass!r} has a URI part: nginx then keys the rewritten upstream "
            "URI; set proxy_cache_key in nginx (e.g. $scheme://$host$request_uri) and key here"
        )
    match = _HOST_PORT.fullmatch(hostport)
    if match is None or "@" in hostport:
        raise ValueError(f"proxy_pass {proxy_pass!r} has no valid host[:port]: {expected}")
    host, port = match[1], match[2]
    if port is None or int(port) == _DEFAULT_PORTS[scheme]:
        return scheme, host
    return scheme, f"{host}:{port}"


def url_parts(url: str) -> KeyParts:
    """Host, decoded path and query of an absolute URL, normalised as index entries are."""
    values = _url_variables(url)
    return KeyParts(values["host"], values["uri"], values["args"] or None)


def forget_urls() -> None:
    """Drop the remembered URL variables (tests: each must compute its own)."""
    _url_variables.cache_clear()


#: A KeyParts as a plain tuple, (host, path, query): the form the index keeps.
Reading = tuple[str | None, str | None, str | None]


# One reading of a key matches a purge item by these rules; a file is purged only when
# EVERY reading of its key matches (an ambiguous key must not be evicted for a purge that
# names only one of the objects it may stand for). A reading without a host is an object
# that serves every host (the key ignores the host).


def host_reading_matches(reading: Reading, host: str) -> bool:
    """Whether ``reading`` belongs to ``host`` (lower case), or to every host."""
    return reading[0] is None or reading[0] == host


def url_reading_matches(reading: Reading, want: KeyParts, *, has_query: bool) -> bool:
    """Whether ``reading`` is the URL ``want`` (:func:`url_parts`); the query counts only when
    the key holds it (``has_query``)."""
    host, path, query = reading
    return (
        host in (None, want.host)
        and path is not None
        and path == want.path
        and (not has_query or query == want.query)
    )


def prefix_reading_matches(reading: Reading, want: KeyParts) -> bool:
    """Whether ``reading`` lies at or under the prefix URL ``want`` (:func:`url_parts`)."""
    host, path, _ = reading
    return host in (None, want.host) and path is not None and path_under(path, want.path or "/")


def _remember(memo: dict[str, _T], key: str, value: _T) -> _T:
    """Store ``value`` under ``key`` in one of a template's memos; a memo that holds
    ``_URL_MEMO`` entries is emptied first (a few batches' worth is all they are for)."""
    if len(memo) >= _URL_MEMO:  # ('>' keeps one entry more: the same answers either way)
        memo.clear()
    memo[key] = value
    return value


def _pieces(template: str) -> tuple[tuple[str, str], ...]:
    pieces, last = [], 0
    for match in _VARIABLE.finditer(template):
        pieces.append((template[last : match.start()], match[1] or match[2]))
        last = match.end()
    # "" is no variable (any non-variable name would do): values.get("", "") adds nothing.
    pieces.append((template[last:], ""))
    return tuple(pieces)


class KeyTemplate:
    """An nginx ``proxy_cache_key`` template: renders keys for URLs and reads keys back.

    ``proxy_host`` is the value of ``$proxy_host``; None (unknown) reads any host[:port] in
    its place, and then :meth:`render` cannot compute keys (see :attr:`renders`).
    ``description`` names the template in messages. Raises ``ValueError`` for unsupported
    variables.
    """

    def __init__(
        self, template: str, proxy_host: str | None = None, *, description: str | None = None
    ) -> None:
        names = template_variables(template)
        self.template = template
        self.proxy_host = proxy_host
        self.variables = frozenset(names)
        self.description = description or f"key template {template!r}"
        #: Request headers, cookies and arguments the key holds (their values are unknown).
        self.request_variables = frozenset(filter(is_request_variable, names))
        #: Whether :meth:`render` can compute keys: not with an unknown ``$proxy_host``, nor
        #: with request variables (one URL has a key per value of them).
        self.renders = (
            "proxy_host" not in self.variables or proxy_host is not None
        ) and not self.request_variables
        #: Whether the key tells objects of different hosts / queries apart.
        self.has_host = "host" in self.variables
        self.has_query = bool(self.variables & {"request_uri", "args"})
        self._patterns = tuple(self._pattern(scheme) for scheme in ("https", "http"))
        # The template as (text before a variable, the variable's name) pairs, ending with
        # (the text after the last one, ""): rendering joins them, no regex per key.
        self._pieces = _pieces(template)
        self._url_keys: dict[str, str | None] = {}  # url_key's memo, see there
        self._readings: dict[str, tuple[Reading, ...]] = {}  # readings' memo, see there

    @classmethod
    def nginx_default(cls, proxy_pass: str | None = None) -> KeyTemplate:
        """nginx's key when no ``proxy_cache_key`` is set, for ``proxy_pass`` (no URI part).

        With ``proxy_pass = "http://127.0.0.1:8080"`` that is ``http://$proxy_host$request_uri``
        with ``$proxy_host`` ``127.0.0.1:8080``. Without it the upstream is unknown: keys of
        any http or https upstream are read back, and nothing is rendered. Raises
        ``ValueError`` for a ``proxy_pass`` :func:`proxy_host_of` rejects.
        """
        if proxy_pass is None:
            # $scheme only reads back here (http or https): it never renders, as
            # $proxy_host is unknown, so the client's scheme cannot slip into a key.
            return cls(
                "$scheme://$proxy_host$request_uri",
                description="nginx's default key (no proxy_cache_key; proxy_pass not set)",
            )
        scheme, proxy_host = proxy_host_of(proxy_pass)
        return cls(
            f"{scheme}://$proxy_host$request_uri",
            proxy_host,
            description=f"nginx's default key (no proxy_cache_key) for proxy_pass {proxy_pass!r}",
        )

    def __repr__(self) -> str:
        return f"KeyTemplate({self.template!r}, proxy_host={self.proxy_host!r})"

    def render(self, url: str) -> str:
        """The cache key nginx computes for a request of ``url`` (an absolute URL).

        Raises ``ValueError`` when the template cannot render (:attr:`renders` is false).
        """
        if not self.renders:
            why = (
                "the request variables it holds have a value per request"
                if self.request_variables
                else "the $proxy_host value (proxy_pass) is not known"
            )
            raise ValueError(f"{self.description} cannot compute keys: {why}")
        return self._render(url)

    def _render(self, url: str) -> str:
        """:meth:`render` without its check: request variables render empty."""
        values = _url_variables(url)
        # Any text would do for an unknown $proxy_host: render() refuses a template using it
        # and ambiguous_example() gives it a stand-in, so this value never reaches a key.
        proxy_host = self.proxy_host or ""
        return "".join(
            [
                text + (proxy_host if name == "proxy_host" else values.get(name, ""))
                for text, name in self._pieces
            ]
        )

    def url_key(self, url: str) -> str | None:
        """The key nginx computes for ``url`` if a URL purge of it may evict that key's file
        (:meth:`renders`, and :meth:`key_means_only`); None if not.

        Raises ``ValueError`` for a malformed URL, as :meth:`render` does. Remembered for the
        last few thousand URLs: the nginx target asks once for the files to evict and again
        for the purge's refill window.
        """
        memo = self._url_keys
        if url in memo:
            return memo[url]
        key: str | None = None
        if self.renders:
            key = self._render(url)
            if not self.key_means_only(key, url):
                key = None
        return _remember(memo, url, key)  # (under another key: worked out again, the same)

    def key_means_only(self, key: str, url: str) -> bool:
        """Whether every reading of ``key`` is ``url``: only then may a URL purge evict it.

        False for a key this template cannot read, and for an ambiguous one
        (``httpshop.example/x`` with ``$scheme$host$request_uri`` is also
        ``https://hop.example/x``).
        """
        readings = self.readings(key)
        want = url_parts(url)
        return bool(readings) and all(
            url_reading_matches(reading, want, has_query=self.has_query) for reading in readings
        )

    def ambiguous_example(self) -> tuple[str, tuple[KeyParts, ...]] | None:
        """A key this template renders that reads back as several objects, with its readings;
        None when every probe reads back as one (the template is unambiguous)."""
        template = self
        if self.proxy_host is None:  # probe with a stand-in upstream: only the shape matters
            template = KeyTemplate(self.template, "127.0.0.1:8080")
        for url in _AMBIGUITY_PROBES:
            key = template._render(url)
            readings = template.invert(key)
            if len(readings) > 1:
                return key, readings
        return None

    def _pattern(self, scheme: str) -> re.Pattern[str]:
        pattern, seen, last = [], set(), 0
        for match in _VARIABLE.finditer(self.template):
            pattern.append(re.escape(self.template[last : match.start()]))
            last = match.end()
            name = match[1] or match[2]
            if name == "scheme":
                pattern.append(scheme)
            elif name == "proxy_host":
                known = self.proxy_host
                pattern.append(_ANY_PROXY_HOST if known is None else re.escape(known))
            elif name in seen:
                pattern.append(f"(?P={name})")
            else:
                seen.add(name)
                # A request variable's value is anything; it is read past, never kept.
                capture = ".*?" if is_request_variable(name) else _CAPTURE[name]
                pattern.append(f"(?P<{name}>{capture})")
        pattern.append(re.escape(self.template[last:]))
        # DOTALL changes nothing for keys read from cache files, which end at the first '\n'
        # (cache_file.parse_cache_head); it keeps a read-back from stopping at one elsewhere.
        return re.compile("".join(pattern), re.DOTALL)

    def invert(self, key: str) -> tuple[KeyParts, ...]:
        """Every (host, path, query) reading of ``key``; empty if the template cannot match."""
        return tuple(KeyParts(*reading) for reading in self.readings(key))

    def readings(self, key: str) -> tuple[Reading, ...]:
        """:meth:`invert` as plain tuples, the form the index keeps.

        Remembered for the last few thousand keys: a URL purge reads its key back twice
        (may it evict the file? which Vary variants share the key?).
        """
        found = self._readings.get(key)  # (a lookup always missing reads it again: the same)
        if found is None:
            # (Stored under another key, it is read again next time: the same readings.)
            found = _remember(self._readings, key, self._read(key))
        return found

    def _read(self, key: str) -> tuple[Reading, ...]:
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
