"""nginx key templates in-process: URL parts, proxy_pass, read-back and the messages.

tests/test_nginx.py checks keys against what a real nginx writes; these pin the edges it
does not reach (ports and brackets, a URI part in proxy_pass, repeated variables, queries
the key leaves out) fast enough for scripts/mutate to run them for every mutant.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from drainbus.drain.key_template import (
    KeyParts,
    KeyTemplate,
    prefix_reading_matches,
    proxy_host_of,
    template_variables,
    url_parts,
)

_SUPPORTED = (
    "use only $scheme, $host, $proxy_host, $request_uri, $uri, $is_args, $args, $http_NAME, "
    "$cookie_NAME and $arg_NAME"
)
_EXPECTED = "expected the URL written in nginx's proxy_pass, e.g. 'http://127.0.0.1:8080'"
_URI_PART = (
    "has a URI part: nginx then keys the rewritten upstream URI; set proxy_cache_key in nginx "
    "(e.g. $scheme://$host$request_uri) and key here"
)


def whole(message: str) -> str:
    """A pytest.raises pattern that matches exactly ``message``, to its last word."""
    return f"^{re.escape(message)}$"


@pytest.mark.parametrize(
    ("url", "host"),
    [
        pytest.param("http://H.Example./x", "h.example", id="trailing-dot"),
        pytest.param("http://u:p@h.example/x", "h.example", id="user-info"),
        pytest.param("http://[::1]:8080/x", "[::1]", id="ipv6-port"),
        pytest.param("http://h.example:8080/x", "h.example", id="port"),
    ],
)
def test_url_host_is_nginx_host(url: str, host: str) -> None:
    """A URL's host is nginx's $host: lower case, without user info, port or trailing dot."""
    assert url_parts(url).host == host


def test_a_question_mark_in_the_fragment_is_no_query() -> None:
    """Only a '?' before the '#' starts a query: '/x#a?b' is the path '/x' alone."""
    assert KeyTemplate("$host$request_uri").render("http://h/x#a?b") == "h/x"


@pytest.mark.parametrize(
    ("proxy_pass", "message"),
    [
        pytest.param("ftp://h.example", f"is not an http(s) URL: {_EXPECTED}", id="ftp"),
        pytest.param("h.example:8080", f"is not an http(s) URL: {_EXPECTED}", id="no-scheme"),
        pytest.param("http://h.example?x", _URI_PART, id="query"),
        pytest.param("http://h.example#x", _URI_PART, id="fragment"),
        pytest.param("http://h.example/http://x", _URI_PART, id="url-in-path"),
    ],
)
def test_proxy_pass_errors_are_whole(proxy_pass: str, message: str) -> None:
    """A proxy_pass no template describes is refused with the whole reason and the fix."""
    with pytest.raises(ValueError, match=whole(f"proxy_pass {proxy_pass!r} {message}")):
        proxy_host_of(proxy_pass)


@pytest.mark.parametrize(
    ("template", "shown"),
    [("$host$", "a bare '$'"), ("$host$foo", "$foo")],
    ids=["bare-dollar", "unknown"],
)
def test_unsupported_variable_messages_are_whole(template: str, shown: str) -> None:
    """An unsupported variable is named (a lone '$' in words) with every supported one."""
    message = f"key template {template!r} uses unsupported variables {shown}: {_SUPPORTED}"
    with pytest.raises(ValueError, match=whole(message)):
        template_variables(template)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        pytest.param(
            KeyTemplate.nginx_default,
            "nginx's default key (no proxy_cache_key; proxy_pass not set) cannot compute keys: "
            "the $proxy_host value (proxy_pass) is not known",
            id="unknown-proxy-host",
        ),
        pytest.param(
            lambda: KeyTemplate("$host$uri$http_accept"),
            "key template '$host$uri$http_accept' cannot compute keys: the request variables "
            "it holds have a value per request",
            id="request-variable",
        ),
    ],
)
def test_templates_that_cannot_render_say_why(
    template: Callable[[], KeyTemplate], message: str
) -> None:
    """render() refuses a key it cannot know, naming the template and the missing value."""
    # Built in the test, not at collection: scripts/mutate switches mutants per test.
    with pytest.raises(ValueError, match=whole(message)):
        template().render("http://h.example/x")


def test_host_and_query_are_known_from_the_variables() -> None:
    """has_host and has_query say whether the key tells hosts and queries apart."""
    full = KeyTemplate("$scheme$host$request_uri")
    assert full.has_host is True
    assert full.has_query is True
    assert KeyTemplate("$host$uri$is_args$args").has_query is True
    default = KeyTemplate.nginx_default("http://127.0.0.1:8080")
    assert default.has_host is False
    assert default.has_query is True
    assert KeyTemplate("$scheme$host$uri").has_query is False


@pytest.mark.parametrize(
    ("template", "key", "url", "means"),
    [
        pytest.param("$scheme$host$uri", "httph.example/x", "http://h.example/x?a=1", True,
                     id="query-not-in-key"),
        pytest.param("$scheme$host$request_uri", "httph.example/x?a=1",
                     "http://h.example/x?a=2", False, id="request-uri-query"),
        pytest.param("$host$uri$is_args$args", "h.example/x?a=1", "http://h.example/x?a=2",
                     False, id="args-query"),
        pytest.param("$host$uri$is_args$args", "h.example/x?a=1", "http://h.example/x?a=1",
                     True, id="same-query"),
    ],
)  # fmt: skip
def test_a_query_counts_only_when_the_key_holds_it(
    template: str, key: str, url: str, means: bool
) -> None:
    """A key without the query is every query's object; with it, only its own query's."""
    assert KeyTemplate(template).key_means_only(key, url) is means


def test_a_repeated_variable_must_read_the_same_both_times() -> None:
    """'$host:$host$uri' reads a key only where both hosts are one and the same."""
    template = KeyTemplate("$host:$host$uri")
    assert template.readings("a.example:a.example/x") == (("a.example", "/x", None),)
    assert template.readings("a.example:b.example/x") == ()


def test_a_key_without_a_path_reads_as_host_alone() -> None:
    """A template with no URI variable reads its keys as (host, None, None)."""
    assert KeyTemplate("$scheme://$host").readings("http://h.example") == (
        ("h.example", None, None),
    )


def test_a_prefix_without_a_path_is_the_whole_host() -> None:
    """A prefix whose path is unknown covers every path of its host."""
    assert prefix_reading_matches(("h", "/any/path", None), KeyParts("h", None, None))
    assert not prefix_reading_matches(("g", "/any/path", None), KeyParts("h", None, None))


@pytest.mark.parametrize(
    ("template", "key"),
    [
        # $proxy_host unknown: probed with a stand-in upstream, whose value shows in the key.
        ("$scheme$host/$proxy_host$request_uri", "httpshop.example/127.0.0.1:8080/x?a=1"),
        # A request variable renders empty in the example.
        ("$scheme$host$uri$http_accept", "httpshop.example/x"),
    ],
    ids=["unknown-proxy-host", "request-variable"],
)
def test_an_ambiguous_template_is_shown_by_a_key_that_reads_two_ways(
    template: str, key: str
) -> None:
    """The example is a key the template renders that reads as both hosts of the probe."""
    example = KeyTemplate(template).ambiguous_example()
    assert example is not None
    assert example[0] == key
    assert sorted(part.host or "" for part in example[1]) == ["hop.example", "shop.example"]


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(lambda: KeyTemplate("$scheme://$host$request_uri"), id="separated"),
        pytest.param(lambda: KeyTemplate.nginx_default("http://127.0.0.1:8080"), id="default"),
        pytest.param(KeyTemplate.nginx_default, id="default-unknown-upstream"),
    ],
)
def test_an_unambiguous_template_has_no_example(template: Callable[[], KeyTemplate]) -> None:
    """A template whose every probe reads back one way is not reported as ambiguous."""
    assert template().ambiguous_example() is None


@pytest.mark.parametrize(
    ("template", "url", "key"),
    [
        pytest.param(lambda: KeyTemplate("$scheme://$host$request_uri"), "http://h.example/x",
                     "http://h.example/x", id="renders"),
        pytest.param(lambda: KeyTemplate("$scheme$host$request_uri"), "http://shop.example/x",
                     None, id="ambiguous"),
        pytest.param(KeyTemplate.nginx_default, "http://h.example/x", None, id="cannot-render"),
    ],
)  # fmt: skip
def test_url_key_is_the_key_only_when_it_means_only_that_url(
    template: Callable[[], KeyTemplate], url: str, key: str | None
) -> None:
    """url_key gives the key a URL purge may evict, None where it may evict none; asked
    again (it remembers), the same."""
    made = template()
    assert made.url_key(url) == key
    assert made.url_key(url) == key
