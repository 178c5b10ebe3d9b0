"""The purge grammar, the scope rules and boundary-aware prefix matching."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from drainbus.drain.purges import (
    MAX_JSON_ITEMS,
    MAX_TOKEN_LENGTH,
    MAX_URL_HEADERS,
    Purge,
    fold_tag,
    parse_purge,
)
from drainbus.drain.scope import ScopeRule, check_scope, key_host_for, key_hosts
from drainbus.drain.url_rules import path_prefix_regex, path_under, url_matches_prefix
from drainbus.errors import ConfigError, DataError, ExitCode, PermissionDenied

PAGES = ScopeRule(key_host="{key}.pages.example")
NO_HOSTS = ScopeRule()


# --- parse_purge: the forms that parse ------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("acme-blog", Purge(keys=frozenset({"acme-blog"})), id="bare-key"),
        pytest.param("Acme_Blog.v2", Purge(keys=frozenset({"Acme_Blog.v2"})), id="key-charset"),
        pytest.param("0day", Purge(keys=frozenset({"0day"})), id="key-starts-with-digit"),
        pytest.param("  acme-blog \t\r\n", Purge(keys=frozenset({"acme-blog"})), id="stripped"),
        pytest.param("tag:acme-blog", Purge(tags=frozenset({"acme-blog"})), id="tag"),
        pytest.param(
            "tag:acme-blog:posts/42_a.b",
            Purge(tags=frozenset({"acme-blog:posts/42_a.b"})),
            id="tag-charset",
        ),
        pytest.param("tag:seg-café", Purge(tags=frozenset({"seg-café"})), id="tag-non-ascii"),
        pytest.param(
            "prefix:https://h.example" + "/a" * 31,
            Purge(prefixes=frozenset({"https://h.example" + "/a" * 31})),
            id="prefix-31-slashes",
        ),
        pytest.param("tag:Ünïcødé-标签", Purge(tags=frozenset({"Ünïcødé-标签"})), id="tag-scripts"),
        pytest.param("tag:*", Purge(tags=frozenset({"*"})), id="tag-star"),
        pytest.param("tag:a;b", Purge(tags=frozenset({"a;b"})), id="tag-semicolon"),
        pytest.param(
            "https://Acme.Pages.Example/Blog/Post?Page=2",
            Purge(urls=frozenset({"https://acme.pages.example/Blog/Post?Page=2"})),
            id="bare-url-host-lowered-path-kept",
        ),
        pytest.param(
            "HTTP://H.example/x", Purge(urls=frozenset({"http://h.example/x"})), id="scheme-case"
        ),
        pytest.param(
            "url:http://h.example:8080/a%20b",
            Purge(urls=frozenset({"http://h.example:8080/a%20b"})),
            id="url-with-port",
        ),
        pytest.param(
            "url:https://[2001:DB8::1]/x",
            Purge(urls=frozenset({"https://[2001:db8::1]/x"})),
            id="url-ipv6",
        ),
        pytest.param(
            "https://h.example", Purge(urls=frozenset({"https://h.example"})), id="no-path"
        ),
        pytest.param(
            "prefix:https://H.example/docs",
            Purge(prefixes=frozenset({"https://h.example/docs"})),
            id="prefix",
        ),
        pytest.param(
            "prefix:https://h.example",
            Purge(prefixes=frozenset({"https://h.example"})),
            id="prefix-whole-host",
        ),
        pytest.param(
            "host:Acme.Pages.Example",
            Purge(hosts=frozenset({"acme.pages.example"})),
            id="host-lowered",
        ),
        pytest.param("host:localhost", Purge(hosts=frozenset({"localhost"})), id="single-label"),
        pytest.param("*", Purge(everything=True), id="everything"),
    ],
)
def test_line_forms_parse(line: str, expected: Purge) -> None:
    """Each one-line form parses to the Purge the grammar table promises."""
    assert parse_purge(line) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("soft:acme-blog", Purge(keys=frozenset({"acme-blog"})), id="bare-key"),
        pytest.param("soft:tag:a:b/c", Purge(tags=frozenset({"a:b/c"})), id="tag"),
        pytest.param(
            "soft:url:https://H.example/x?y=1",
            Purge(urls=frozenset({"https://h.example/x?y=1"})),
            id="url",
        ),
        pytest.param(
            "soft:HTTPS://h.example/x",
            Purge(urls=frozenset({"https://h.example/x"})),
            id="bare-url",
        ),
        pytest.param(
            "soft:prefix:https://h.example/docs",
            Purge(prefixes=frozenset({"https://h.example/docs"})),
            id="prefix",
        ),
        pytest.param("soft:host:H.example", Purge(hosts=frozenset({"h.example"})), id="host"),
        pytest.param("soft:*", Purge(everything=True), id="everything"),
        pytest.param("  soft:acme \r\n", Purge(keys=frozenset({"acme"})), id="stripped"),
    ],
)
def test_soft_prefix_marks_any_line_form_soft(line: str, expected: Purge) -> None:
    """soft:FORM parses as FORM would, with soft set; the form without it is not soft."""
    assert parse_purge(line) == replace(expected, soft=True)
    assert parse_purge(line.strip().removeprefix("soft:")) == expected


def test_soft_alone_is_still_a_bare_key() -> None:
    """'soft' without a colon is a site key like any other, not a soft purge."""
    assert parse_purge("soft") == Purge(keys=frozenset({"soft"}))


def test_json_form_carries_every_field() -> None:
    """A JSON purge fills each field, checked and normalised like the one-line forms."""
    line = json.dumps(
        {
            "tags": ["acme-blog", "acme-blog"],
            "urls": ["https://ACME.pages.example/a"],
            "prefixes": ["https://acme.pages.example/docs"],
            "hosts": ["ACME.pages.example"],
            "keys": ["acme"],
            "everything": False,
            "soft": True,
        }
    )
    assert parse_purge(line) == Purge(
        tags=frozenset({"acme-blog"}),
        urls=frozenset({"https://acme.pages.example/a"}),
        prefixes=frozenset({"https://acme.pages.example/docs"}),
        hosts=frozenset({"acme.pages.example"}),
        keys=frozenset({"acme"}),
        soft=True,
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param('{"keys": ["acme"]}', Purge(keys=frozenset({"acme"})), id="one-field"),
        pytest.param('{"everything": true}', Purge(everything=True), id="everything"),
        pytest.param(
            '{"everything": true, "soft": true}', Purge(everything=True, soft=True), id="soft-all"
        ),
    ],
)
def test_json_fields_are_optional(line: str, expected: Purge) -> None:
    """A JSON purge may leave out any field as long as it names something to purge."""
    assert parse_purge(line) == expected


def test_json_lists_may_hold_the_maximum() -> None:
    """A JSON list of exactly MAX_JSON_ITEMS items is accepted."""
    tags = [f"acme-{n}" for n in range(MAX_JSON_ITEMS)]
    assert len(parse_purge(json.dumps({"tags": tags})).tags) == MAX_JSON_ITEMS


@pytest.mark.parametrize("kind", ["tag:", ""], ids=["tag", "key"])
def test_token_may_be_exactly_the_maximum_length(kind: str) -> None:
    """A key or tag of exactly MAX_TOKEN_LENGTH characters is accepted."""
    purge = parse_purge(kind + "a" * MAX_TOKEN_LENGTH)
    assert (purge.tags or purge.keys) == {"a" * MAX_TOKEN_LENGTH}


def test_purges_are_hashable_values() -> None:
    """Equal lines give equal, hashable purges, so duplicates collapse in a set."""
    purges = {parse_purge("tag:a"), parse_purge(" tag:a "), parse_purge('{"tags": ["a"]}')}
    assert purges == {Purge(tags=frozenset({"a"}))}


# --- parse_purge: the rules it enforces -----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param("", "purge line is empty", id="empty"),
        pytest.param(" \t ", "purge line is empty", id="blank"),
        pytest.param("foo:bar", "unknown purge form 'foo:'", id="unknown-form"),
        pytest.param("acme:blog", "unknown purge form 'acme:'", id="key-with-colon"),
        # keys
        pytest.param(
            "-acme", "key '-acme' must start with a letter or digit", id="key-leading-dash"
        ),
        pytest.param(".acme", "must start with a letter or digit", id="key-leading-dot"),
        pytest.param("acme blog", "key 'acme blog' contains whitespace", id="key-space"),
        pytest.param("acme,blog", "key 'acme,blog' contains ','", id="key-comma"),
        pytest.param("acme/blog", "contains '/'; a key may contain only letters", id="key-slash"),
        pytest.param("café", "contains 'é'", id="key-non-ascii"),
        pytest.param("acme\x00", r"contains control character '\x00'", id="key-nul"),
        pytest.param("a" * 1025, "key is 1025 characters; a key is at most 1,024", id="key-long"),
        # tags
        pytest.param("tag:", "tag is empty", id="tag-empty"),
        pytest.param(
            "tag:" + "t" * 1100, "tag is 1100 characters; a tag is at most 1,024", id="tag-long"
        ),
        pytest.param("tag:a,b", "tag 'a,b' contains ','", id="tag-comma"),
        pytest.param("tag: a", "tag ' a' contains whitespace", id="tag-leading-space"),
        pytest.param("tag:a\tb", "contains whitespace", id="tag-tab"),
        pytest.param("tag:a\x1bb", "control character", id="tag-escape"),
        pytest.param("tag:a\u00a0b", "contains whitespace", id="tag-nbsp"),
        pytest.param("tag:a\u200bb", r"control character '\u200b'", id="tag-zero-width-space"),
        pytest.param("tag:a\u2003b", "contains whitespace", id="tag-em-space"),
        pytest.param("tag:a\u0085b", "contains whitespace", id="tag-next-line"),
        # URLs
        pytest.param("url:", "URL is empty", id="url-empty"),
        pytest.param("url:/acme", "is not an absolute http:// or https:// URL", id="url-relative"),
        pytest.param("url:ftp://h/x", "is not an absolute http", id="url-ftp"),
        pytest.param("url:acme.example/x", "is not an absolute http", id="url-no-scheme"),
        pytest.param("http:acme", "is not an absolute http", id="url-no-slashes"),
        pytest.param("https:///x", "is not an absolute http", id="url-no-host"),
        pytest.param("https://:80/x", "URL 'https://:80/x': host is empty", id="url-port-only"),
        pytest.param("https://u:p@h.example/", "has user info", id="url-userinfo"),
        pytest.param("https://h.example/x#top", "has a fragment", id="url-fragment"),
        pytest.param("https://h.example/x#", "has a fragment", id="url-empty-fragment"),
        pytest.param("https://h.example/a b", "contains whitespace", id="url-space"),
        # '!' and '~' are the ends of the printable range: the space after them is named.
        pytest.param("https://h.example/!~ b", "contains whitespace", id="url-space-after-!~"),
        pytest.param(
            "https://h.example/ä", "contains 'ä'; a URL is printable ASCII", id="url-utf8"
        ),
        pytest.param("https://h.example:99999/", "is malformed", id="url-port-range"),
        pytest.param("https://h.example:x/", "is malformed", id="url-port-nan"),
        pytest.param(
            "https://exa_mple.com/",
            "URL 'https://exa_mple.com/': host 'exa_mple.com' is not a DNS name",
            id="url-bad-host",
        ),
        pytest.param("https://h.example\\@x/", "has user info", id="url-backslash-userinfo"),
        # prefixes
        pytest.param("prefix:https://h.example/d?x=1", "has a query string", id="prefix-query"),
        pytest.param("prefix:https://h.example/d?", "has a query string", id="prefix-bare-query"),
        pytest.param("prefix:https://h.example/d#x", "has a fragment", id="prefix-fragment"),
        pytest.param(
            "prefix:h.example/d", "prefix URL 'h.example/d' is not an absolute", id="prefix-rel"
        ),
        # hosts
        pytest.param("host:", "host is empty", id="host-empty"),
        pytest.param("host:h.example:8080", "has a port; give the host name alone", id="host-port"),
        pytest.param("host:192.0.2.7:80", "has a port", id="host-ipv4-port"),
        pytest.param("host:[::1]:80", "has a port", id="host-ipv6-port"),
        pytest.param("host:exa_mple.com", "is not a DNS name or IP address", id="host-underscore"),
        pytest.param("host:-a.example", "is not a DNS name", id="host-leading-dash"),
        pytest.param("host:a..example", "is not a DNS name", id="host-empty-label"),
        pytest.param("host:a.example.", "is not a DNS name", id="host-trailing-dot"),
        pytest.param("host:" + "a" * 64 + ".example", "is not a DNS name", id="host-long-label"),
        pytest.param("host:" + "a." * 127 + "aa", "is not a DNS name", id="host-over-253"),
        pytest.param("host:192.0.2.999", "is not a DNS name", id="host-bad-ipv4"),
        # Cloudflare purges host names only: an IP address is refused at pub.
        pytest.param("host:192.0.2.7", "host '192.0.2.7' is an IP address", id="host-ipv4"),
        pytest.param("host:2001:DB8::0:1", "is an IP address", id="host-ipv6"),
        pytest.param("host:[::1]", "host '[::1]' is an IP address", id="host-ipv6-bracketed"),
        pytest.param(
            '{"hosts": ["h.example", "10.0.0.1"]}',
            "item 1: host '10.0.0.1' is an IP",
            id="json-host-ip",
        ),
        # Cloudflare: "Path separators are limited to 31 for a prefix".
        pytest.param(
            "prefix:https://h.example" + "/a" * 32,
            "has 32 '/' in its path; Cloudflare takes at most 31",
            id="prefix-32-slashes",
        ),
        pytest.param(
            "prefix:https://h.example" + "/a" * 31 + "/",
            "has 32 '/'",
            id="prefix-32-slashes-trailing",
        ),
        pytest.param("tag:seg café", "contains whitespace", id="tag-space-non-ascii"),
        pytest.param("host:[192.0.2.7]", "is not a DNS name", id="host-bracketed-ipv4"),
        pytest.param("host:https://h.example/", "is not a DNS name", id="host-url"),
        # soft:
        pytest.param("soft:", "'soft:' names nothing to purge", id="soft-empty"),
        pytest.param("soft:soft:acme", "'soft:' is given twice", id="soft-twice"),
        pytest.param('soft:{"tags": ["a"]}', 'says soft with "soft": true', id="soft-json"),
        pytest.param("soft: acme", "key ' acme' contains whitespace", id="soft-space"),
        pytest.param("soft:tag:", "tag is empty", id="soft-tag-empty"),
        pytest.param("soft:foo:bar", "unknown purge form 'foo:'", id="soft-unknown-form"),
        pytest.param("Soft:acme", "unknown purge form 'Soft:'", id="soft-case"),
    ],
)
def test_line_rules_are_enforced(line: str, message: str) -> None:
    """A line that breaks a rule raises DataError (exit 65) whose message names the rule."""
    with pytest.raises(DataError) as caught:
        parse_purge(line)
    assert message in caught.value.message
    assert caught.value.exit_code == ExitCode.DATAERR


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param('{"tags": [', "not valid JSON: Expecting value at column 11", id="truncated"),
        pytest.param('{"tags": []} x', "not valid JSON: Extra data", id="trailing-text"),
        pytest.param("{'tags': []}", "not valid JSON", id="single-quotes"),
        pytest.param(
            '{"tag": ["a"]}', "unknown JSON field 'tag'; use tags, urls", id="unknown-field"
        ),
        pytest.param('{"tags": "acme"}', "JSON field 'tags' must be a list of strings", id="str"),
        pytest.param('{"urls": [1]}', "JSON field 'urls' must be a list of strings", id="int-item"),
        pytest.param('{"hosts": null}', "JSON field 'hosts' must be a list of strings", id="null"),
        pytest.param('{"keys": [["a"]]}', "'keys' must be a list of strings", id="nested-list"),
        pytest.param(
            '{"everything": 1}', "JSON field 'everything' must be true or false", id="int"
        ),
        pytest.param(
            '{"tags": ["a"], "soft": "yes"}', "'soft' must be true or false", id="soft-str"
        ),
        pytest.param("{}", "JSON purge names nothing to purge", id="empty-object"),
        pytest.param('{"soft": true}', "names nothing to purge", id="only-soft"),
        pytest.param('{"tags": [], "everything": false}', "names nothing to purge", id="all-empty"),
        pytest.param(
            '{"tags": ["ok", "a b"]}',
            "JSON field 'tags' item 1: tag 'a b' contains whitespace",
            id="bad-tag-item",
        ),
        pytest.param('{"keys": ["-x"]}', "item 0: key '-x' must start with", id="bad-key-item"),
        pytest.param('{"urls": ["/x"]}', "'urls' item 0: URL '/x' is not", id="bad-url-item"),
        pytest.param(
            '{"prefixes": ["https://h.example/?a"]}', "has a query string", id="bad-prefix-item"
        ),
        pytest.param('{"hosts": ["h:1"]}', "'hosts' item 0: host 'h:1' has a port", id="host-item"),
        pytest.param(
            '{"tags": ["a"], "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "nested too deeply",
            id="deep-nesting",
        ),
    ],
)
def test_json_rules_are_enforced(line: str, message: str) -> None:
    """Bad JSON, wrong types and unknown fields raise DataError naming the field."""
    with pytest.raises(DataError) as caught:
        parse_purge(line)
    assert message in caught.value.message


def test_json_urls_may_carry_request_headers() -> None:
    """A urls entry with headers keeps them (sorted pairs) and its URL is purged as any URL."""
    purge = parse_purge(
        json.dumps({"urls": [
            {"url": "HTTPS://A.example/x", "headers": {"Accept-Language": "de"}},
            "https://a.example/x",
            {"url": "https://a.example/y"},
        ]})
    )  # fmt: skip
    assert purge.urls == {"https://a.example/x", "https://a.example/y"}
    assert purge.url_headers == {
        ("https://a.example/x", (("Accept-Language", "de"),)),
        ("https://a.example/x", ()),
        ("https://a.example/y", ()),
    }


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        pytest.param({"url": "https://a.example/x", "headers": {"Bad Name": "x"}},
                     "not an HTTP header name", id="header-name"),
        pytest.param({"url": "https://a.example/x", "headers": {"A": "x\r\nB: y"}},
                     "control character", id="header-crlf"),
        pytest.param({"url": "https://a.example/x", "headers": {"A": 1}},
                     "object of header names to strings", id="header-int"),
        pytest.param({"url": "https://a.example/x", "heads": {}}, "unknown URL entry field",
                     id="unknown-field"),
        pytest.param({"headers": {}}, 'a string or {"url"', id="no-url"),
        pytest.param({"url": "ftp://a.example/x"}, "not an absolute http", id="bad-url"),
    ],
)  # fmt: skip
def test_json_urls_entries_are_checked(entry: dict[str, object], rule: str) -> None:
    """A urls entry with headers is checked as strictly as a URL line."""
    with pytest.raises(DataError, match=re.escape(rule)) as caught:
        parse_purge(json.dumps({"urls": ["https://a.example/ok", entry]}))
    assert "JSON field 'urls' item 1" in caught.value.message


@pytest.mark.parametrize("field", ["tags", "urls", "prefixes", "hosts", "keys"])
def test_json_lists_over_the_maximum_are_rejected(field: str) -> None:
    """Any JSON list longer than MAX_JSON_ITEMS is rejected, naming the field and the limit."""
    line = json.dumps({field: ["x"] * (MAX_JSON_ITEMS + 1)})
    with pytest.raises(
        DataError, match=f"JSON field '{field}' has 1,001 items; a list holds at most 1,000"
    ):
        parse_purge(line)


def test_long_input_is_cut_short_in_messages() -> None:
    """A message quotes long bad input only in part, so error lines stay readable."""
    with pytest.raises(DataError) as caught:
        parse_purge("https://h.example/" + "x" * 500 + " y")
    assert len(caught.value.message) < 200


# --- ScopeRule and key_host_for -------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("pages.example", id="no-placeholder"),
        pytest.param("{key}.{key}.example", id="two-placeholders"),
        pytest.param("{key}.{zone}.example", id="other-placeholder"),
        pytest.param("{}.pages.example", id="positional"),
        pytest.param("{key}}.example", id="stray-brace"),
    ],
)
def test_key_host_template_needs_exactly_one_key(template: str) -> None:
    """A key_host template without exactly one '{key}' (and no other braces) is a ConfigError."""
    with pytest.raises(ConfigError, match="exactly one"):
        ScopeRule(key_host=template)


def test_owner_separator_must_not_be_empty() -> None:
    """An empty owner separator would make 'acme' own 'acmex', so it is a ConfigError."""
    with pytest.raises(ConfigError, match="owner_separator is empty"):
        ScopeRule(owner_separator="")


@pytest.mark.parametrize(
    ("rule", "key", "host"),
    [
        pytest.param(PAGES, "acme-blog", "acme-blog.pages.example", id="suffix-template"),
        pytest.param(PAGES, "Acme-Blog", "acme-blog.pages.example", id="lower-cased"),
        pytest.param(
            ScopeRule(key_host="www-{key}.Sites.example"),
            "acme",
            "www-acme.sites.example",
            id="prefix-template",
        ),
        pytest.param(PAGES, "acme_blog", None, id="not-a-dns-name"),
        pytest.param(NO_HOSTS, "acme", None, id="no-template"),
    ],
)
def test_key_host_for(rule: ScopeRule, key: str, host: str | None) -> None:
    """key_host_for gives the key's lower-case host, or None when there is no valid one."""
    assert key_host_for(rule, key) == host


# --- check_scope ----------------------------------------------------------------------------


def _keys_or_tags(form: str, name: str) -> Purge:
    """A purge of the one key or tag ``name`` (``form`` is "keys" or "tags")."""
    return Purge(keys=frozenset({name})) if form == "keys" else Purge(tags=frozenset({name}))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("acme", id="own-name"),
        pytest.param("acme-blog", id="separator-boundary"),
        pytest.param("acme-blog-2", id="deeper"),
        pytest.param("acme-", id="bare-separator"),
        # User names are unique regardless of case, and hosts compare without it: so do keys.
        pytest.param("Acme-blog", id="case-differs"),
    ],
)
@pytest.mark.parametrize("form", ["keys", "tags"])
def test_users_may_purge_keys_and_tags_they_own(name: str, form: str) -> None:
    """'acme' owns the key and tag 'acme' and everything starting with 'acme-', in any case."""
    check_scope(_keys_or_tags(form, name), user="acme", is_admin=False, rule=NO_HOSTS)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("acmex", id="no-boundary"),
        pytest.param("acme_blog", id="underscore-is-not-the-separator"),
        pytest.param("acme.blog", id="dot-is-not-the-separator"),
        pytest.param("acme:blog", id="colon-is-not-the-separator"),
        pytest.param("acm", id="shorter"),
        pytest.param("bob", id="someone-else"),
        pytest.param("x-acme", id="contains-name"),
    ],
)
@pytest.mark.parametrize("form", ["keys", "tags"])
def test_users_may_not_purge_keys_and_tags_of_others(name: str, form: str) -> None:
    """Ownership stops at the separator: 'acme' does not own 'acmex' or 'acme_blog'."""
    with pytest.raises(PermissionDenied) as caught:
        check_scope(_keys_or_tags(form, name), user="acme", is_admin=False, rule=PAGES)
    assert caught.value.exit_code == ExitCode.NOPERM
    assert caught.value.user == "acme"
    assert f"{form[:-1]} {name!r} refused: user 'acme' may purge only keys" in str(caught.value)


def test_owner_separator_is_configurable() -> None:
    """With separator '.', 'acme' owns 'acme.blog' but no longer 'acme-blog'."""
    rule = ScopeRule(owner_separator=".")
    check_scope(Purge(keys=frozenset({"acme.blog"})), user="acme", is_admin=False, rule=rule)
    with pytest.raises(PermissionDenied):
        check_scope(Purge(keys=frozenset({"acme-blog"})), user="acme", is_admin=False, rule=rule)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("host:acme.pages.example", id="host-own-name"),
        pytest.param("host:ACME-Blog.Pages.Example", id="host-case-insensitive"),
        pytest.param("https://acme-blog.pages.example/a?b=1", id="url"),
        pytest.param("prefix:https://acme-blog.pages.example/docs", id="prefix"),
        pytest.param('{"hosts": ["acme.pages.example"], "keys": ["acme-x"]}', id="json-mixed"),
    ],
)
def test_users_may_purge_hosts_of_their_keys(line: str) -> None:
    """Hosts, URLs and prefixes are allowed when the host is key_host of an owned key."""
    check_scope(parse_purge(line), user="acme", is_admin=False, rule=PAGES)


@pytest.mark.parametrize(
    ("purge", "refused"),
    [
        pytest.param(
            Purge(hosts=frozenset({"acmex.pages.example"})),
            "host 'acmex.pages.example'",
            id="host-no-boundary",
        ),
        pytest.param(
            Purge(hosts=frozenset({"acme_blog.pages.example"})),
            "host 'acme_blog.pages.example'",
            id="host-underscore",
        ),
        pytest.param(
            Purge(hosts=frozenset({"pages.example"})), "host 'pages.example'", id="template-domain"
        ),
        pytest.param(
            Purge(hosts=frozenset({".pages.example"})), "host '.pages.example'", id="empty-key"
        ),
        pytest.param(
            Purge(hosts=frozenset({"acme.pages.example.evil.example"})),
            "host 'acme.pages.example.evil.example'",
            id="suffix-not-at-end",
        ),
        pytest.param(
            Purge(hosts=frozenset({"x.acme.pages.example"})),
            "host 'x.acme.pages.example'",
            id="subdomain-of-own-host",
        ),
        pytest.param(Purge(hosts=frozenset({"acme"})), "host 'acme'", id="bare-key-as-host"),
        pytest.param(
            Purge(urls=frozenset({"https://bob.pages.example/"})),
            "URL 'https://bob.pages.example/'",
            id="url",
        ),
        pytest.param(
            Purge(prefixes=frozenset({"https://bob.pages.example/acme"})),
            "prefix 'https://bob.pages.example/acme'",
            id="prefix",
        ),
        pytest.param(
            Purge(urls=frozenset({"not a url"})), "URL 'not a url'", id="url-without-host"
        ),
        pytest.param(
            Purge(keys=frozenset({"acme"}), hosts=frozenset({"bob.pages.example"})),
            "host 'bob.pages.example'",
            id="one-bad-item-refuses-all",
        ),
    ],
)
def test_users_may_not_purge_hosts_they_do_not_own(purge: Purge, refused: str) -> None:
    """A host that is not key_host of an owned key is refused, naming the host."""
    with pytest.raises(PermissionDenied) as caught:
        check_scope(purge, user="acme", is_admin=False, rule=PAGES)
    assert str(caught.value).startswith(f"purge of {refused} refused")


def test_refusal_message_names_host_user_and_rule() -> None:
    """The refusal says what was refused, who asked and what they may purge."""
    with pytest.raises(PermissionDenied) as caught:
        check_scope(
            parse_purge("host:other.pages.example"), user="acme", is_admin=False, rule=PAGES
        )
    assert str(caught.value) == (
        "purge of host 'other.pages.example' refused: user 'acme' may purge only keys 'acme' "
        "and 'acme-*' and their hosts"
    )


def test_key_host_template_with_a_leading_part() -> None:
    """A template with text before '{key}' is matched on both sides of the key."""
    rule = ScopeRule(key_host="www-{key}.sites.example")
    check_scope(
        parse_purge("host:www-acme-blog.sites.example"), user="acme", is_admin=False, rule=rule
    )
    with pytest.raises(PermissionDenied):
        check_scope(parse_purge("host:acme.sites.example"), user="acme", is_admin=False, rule=rule)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("host:acme.pages.example", id="host"),
        pytest.param("https://acme.pages.example/", id="url"),
        pytest.param("prefix:https://acme.pages.example/", id="prefix"),
    ],
)
def test_without_key_host_users_may_not_purge_hosts(line: str) -> None:
    """Without key_host, non-admins may purge no host, URL or prefix, not even their own."""
    with pytest.raises(PermissionDenied, match="hosts, URLs and prefixes need an admin"):
        check_scope(parse_purge(line), user="acme", is_admin=False, rule=NO_HOSTS)


@pytest.mark.parametrize("rule", [PAGES, NO_HOSTS], ids=["key-host", "no-key-host"])
def test_only_admins_may_purge_everything(rule: ScopeRule) -> None:
    """'*' is refused for non-admins whatever the rule."""
    with pytest.raises(PermissionDenied, match="only admins may purge everything"):
        check_scope(parse_purge("*"), user="acme", is_admin=False, rule=rule)


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        pytest.param("soft:*", "only admins may purge everything", id="everything"),
        pytest.param("soft:bob", "purge of key 'bob' refused", id="other-key"),
        pytest.param("soft:tag:bob-blog", "purge of tag 'bob-blog' refused", id="other-tag"),
        pytest.param("soft:https://bob.pages.example/", "purge of URL", id="other-url"),
    ],
)
def test_soft_purges_follow_the_same_scope_rules(line: str, refused: str) -> None:
    """A soft purge is refused wherever the hard one is; what the user owns still passes."""
    with pytest.raises(PermissionDenied, match=refused):
        check_scope(parse_purge(line), user="acme", is_admin=False, rule=PAGES)
    for owned in ("soft:acme-blog", "soft:tag:acme", "soft:https://acme-blog.pages.example/x"):
        check_scope(parse_purge(owned), user="acme", is_admin=False, rule=PAGES)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("*", id="everything"),
        pytest.param("bob", id="other-key"),
        pytest.param("tag:bob-blog", id="other-tag"),
        pytest.param("host:cdn.example", id="any-host"),
        pytest.param("https://bob.example/x", id="any-url"),
        pytest.param("prefix:https://bob.example/", id="any-prefix"),
    ],
)
def test_admins_may_purge_anything(line: str) -> None:
    """Admins pass every scope check, even without key_host."""
    check_scope(parse_purge(line), user="root", is_admin=True, rule=NO_HOSTS)


def test_an_empty_user_name_owns_nothing() -> None:
    """A blank identity owns no key, so it cannot purge '-blog' or '' by accident."""
    with pytest.raises(PermissionDenied):
        check_scope(Purge(tags=frozenset({"-blog"})), user="", is_admin=False, rule=PAGES)


# --- url_matches_prefix ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "prefix", "matches"),
    [
        pytest.param("https://h/acme-blog", "https://h/acme-blog", True, id="equal"),
        pytest.param("https://h/acme-blog/x", "https://h/acme-blog", True, id="below"),
        pytest.param("https://h/acme-blog?x=1", "https://h/acme-blog", True, id="query-ignored"),
        pytest.param("https://h/acme-blog#top", "https://h/acme-blog", True, id="fragment-ignored"),
        pytest.param("https://h/acme-blog2", "https://h/acme-blog", False, id="no-boundary"),
        pytest.param(
            "https://h/acme-blog.html", "https://h/acme-blog", False, id="dot-no-boundary"
        ),
        pytest.param("https://h/acme", "https://h/acme-blog", False, id="above"),
        pytest.param("https://h/docs/a", "https://h/docs/", True, id="slash-prefix-below"),
        pytest.param("https://h/docs/", "https://h/docs/", True, id="slash-prefix-equal"),
        pytest.param("https://h/docs", "https://h/docs/", False, id="slash-prefix-parent"),
        pytest.param("https://h/anything/at/all", "https://h/", True, id="root-slash"),
        pytest.param("https://h/anything", "https://h", True, id="root-bare"),
        pytest.param("https://h", "https://h/", True, id="empty-path-is-root"),
        pytest.param("https://h", "https://h/x", False, id="empty-path-not-under-x"),
        pytest.param("http://h/x/y", "https://h/x", True, id="scheme-ignored"),
        pytest.param("https://H.Example/x", "https://h.example/x", True, id="host-case"),
        pytest.param("https://h:8443/x", "https://h/x", True, id="port-ignored"),
        pytest.param("https://h/X", "https://h/x", False, id="path-case-sensitive"),
        pytest.param("https://other/x", "https://h/x", False, id="other-host"),
        pytest.param("https://a.h/x", "https://h/", False, id="subdomain"),
        pytest.param("/x", "https://h/", False, id="relative-url"),
        pytest.param("https://[bad/x", "https://h/", False, id="malformed-url"),
        pytest.param("https://h/x", "/x", False, id="relative-prefix"),
    ],
)
def test_url_matches_prefix(url: str, prefix: str, matches: bool) -> None:
    """Prefix matching respects path boundaries and ignores scheme, port, query and case of host."""
    assert url_matches_prefix(url, prefix) is matches


@pytest.mark.parametrize(
    ("tag", "folded"),
    [("MixedCase", "mixedcase"), ("seg-CAFÉ", "seg-cafÉ"), ("a:B/c", "a:b/c")],
    ids=["ascii", "only-ascii-folds", "punctuation-kept"],
)
def test_tags_fold_ascii_case_only(tag: str, folded: str) -> None:
    """Every target compares tags with ASCII case folded, as Varnish's std.tolower can."""
    assert fold_tag(tag) == folded


# --- whole messages and exact boundaries ----------------------------------------------------
# The rule tests above match the start of a message; these pin each message whole, since the
# user reads all of it, and each limit on both sides of its boundary.

_NOT_DNS = (
    "is not a DNS name or IP address; a name is dot-separated labels of letters, digits and "
    "inner '-', 1 to 63 characters each"
)
_IS_IP = (
    "is an IP address; Cloudflare purges host names only, so give the site's DNS name "
    "(or purge its URLs)"
)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param("host:", "host is empty; give a DNS name or an IP address", id="host-empty"),
        pytest.param("host:exa_mple.com", f"host 'exa_mple.com' {_NOT_DNS}", id="host-not-dns"),
        pytest.param("host:192.0.2.7", f"host '192.0.2.7' {_IS_IP}", id="host-ip"),
        # A bracketed IPv6 literal is an address whatever its last character ('1::' not '1:').
        pytest.param("host:[1::]", f"host '[1::]' {_IS_IP}", id="host-bracketed-ipv6"),
        # Only a bracket at each end makes a literal: one at the end alone is no address.
        pytest.param("host:1::]", f"host '1::]' {_NOT_DNS}", id="host-closing-bracket-only"),
        # An IPv6 address with a zone names an interface of one machine, never a site.
        pytest.param("host:fe80::1%eth0", f"host 'fe80::1%eth0' {_NOT_DNS}", id="host-ipv6-zone"),
        # ':80' after a name that has colons of its own is no port: the name is just invalid.
        pytest.param("host:a:b:80", f"host 'a:b:80' {_NOT_DNS}", id="host-colons-not-port"),
        pytest.param(
            '{"urls": [1]}',
            "JSON field 'urls' must be a list of strings or "
            '{"url": URL, "headers": {NAME: VALUE}} objects',
            id="json-urls-type",
        ),
        pytest.param(
            '{"tags": ["a"], "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "purge line is JSON nested too deeply to read",
            id="json-deep",
        ),
        pytest.param(
            "{}",
            "JSON purge names nothing to purge; give at least one item in tags, urls, prefixes, "
            'hosts or keys, or "everything": true',
            id="json-empty",
        ),
        pytest.param(
            "soft:",
            "'soft:' names nothing to purge; follow it with a line form, as in soft:acme-blog, "
            "soft:tag:KEY, soft:https://... or soft:*",
            id="soft-empty",
        ),
        pytest.param(
            'soft:{"tags": ["a"]}',
            'a JSON purge says soft with "soft": true, not with a soft: prefix',
            id="soft-json",
        ),
        pytest.param("soft:soft:a", "'soft:' is given twice; once is enough", id="soft-twice"),
        pytest.param(
            "tag:a,b",
            "tag 'a,b' contains ','; a tag may contain any printable character but whitespace "
            "and ','",
            id="tag-comma",
        ),
        pytest.param(
            '{"keys": [""]}',
            "JSON field 'keys' item 0: key is empty; a key is 1 to 1,024 characters",
            id="key-empty",
        ),
        pytest.param(
            "https://h.example/a b",
            "URL 'https://h.example/a b' contains whitespace; a URL is printable ASCII, with "
            "anything else percent-encoded",
            id="url-space",
        ),
        pytest.param(
            '{"urls": [{"headers": {}}]}',
            "JSON field 'urls' item 0: a URL entry is a string or "
            '{"url": URL, "headers": {NAME: VALUE}}',
            id="url-entry-no-url",
        ),
        pytest.param(
            '{"urls": [{"url": "https://a.example/", "headers": {"A": 1}}]}',
            "JSON field 'urls' item 0: URL entry 'headers' must be an object of header names "
            "to strings",
            id="url-entry-header-type",
        ),
        # _show quotes up to 80 characters whole, and longer input as 77 and '...'.
        pytest.param(
            "-" + "a" * 79, f"key '-{'a' * 79}' must start with a letter or digit", id="show-80"
        ),
        pytest.param(
            "-" + "a" * 80, f"key '-{'a' * 76}'... must start with a letter or digit", id="show-81"
        ),
    ],
)
def test_messages_are_whole(line: str, message: str) -> None:
    """Each rule's message reads exactly as written, up to its last word."""
    with pytest.raises(DataError) as caught:
        parse_purge(line)
    assert caught.value.message == message


def test_json_numbers_python_will_not_convert_are_data_errors() -> None:
    """An integer too long for Python to convert is bad input (65), named as such."""
    with pytest.raises(DataError) as caught:
        parse_purge('{"tags": [1' + "0" * 5000 + "]}")
    assert caught.value.message.startswith("purge line is not acceptable JSON: ")
    assert "digits" in caught.value.message


@pytest.mark.parametrize("length", [253, 254])
def test_host_names_are_at_most_253_characters(length: int) -> None:
    """A DNS name of 253 characters is a host; one of 254 is not."""
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * (length - 3 * 64)])
    assert len(host) == length
    if length <= 253:
        assert parse_purge("host:" + host) == Purge(hosts=frozenset({host}))
    else:
        with pytest.raises(DataError, match="is not a DNS name"):
            parse_purge("host:" + host)


def test_urls_may_hold_every_printable_ascii_character() -> None:
    """'!' and '~', the two ends of printable ASCII, are URL characters."""
    assert parse_purge("https://h.example/!a~") == Purge(urls=frozenset({"https://h.example/!a~"}))


def test_json_urls_may_hold_the_maximum() -> None:
    """A JSON urls list of exactly MAX_JSON_ITEMS entries is accepted, as the other lists are."""
    urls = [f"https://h.example/{n}" for n in range(MAX_JSON_ITEMS)]
    assert len(parse_purge(json.dumps({"urls": urls})).urls) == MAX_JSON_ITEMS


@pytest.mark.parametrize("count", [MAX_URL_HEADERS, MAX_URL_HEADERS + 1])
def test_a_url_entry_holds_at_most_max_url_headers(count: int) -> None:
    """A urls entry may carry MAX_URL_HEADERS headers; one more is refused, naming both counts."""
    headers = {f"h{n:02}": "v" for n in range(count)}
    line = json.dumps({"urls": [{"url": "https://a.example/", "headers": headers}]})
    if count <= MAX_URL_HEADERS:
        (entry,) = parse_purge(line).url_headers
        assert entry == ("https://a.example/", tuple(sorted(headers.items())))
        return
    with pytest.raises(DataError) as caught:
        parse_purge(line)
    assert caught.value.message == (
        f"JSON field 'urls' item 0: URL entry has {count} headers; at most {MAX_URL_HEADERS}"
    )


def test_refusals_name_the_user_and_the_whole_rule() -> None:
    """Refusals carry the user (for the audit log) and say in full what would be allowed."""
    with pytest.raises(PermissionDenied) as everything:
        check_scope(parse_purge("*"), user="acme", is_admin=False, rule=NO_HOSTS)
    assert everything.value.message == (
        "purge of everything refused: only admins may purge everything"
    )
    assert everything.value.user == "acme"
    with pytest.raises(PermissionDenied) as host:
        check_scope(
            parse_purge("host:acme.pages.example"), user="acme", is_admin=False, rule=NO_HOSTS
        )
    assert host.value.message == (
        "purge of host 'acme.pages.example' refused: user 'acme' may purge only keys 'acme' "
        "and 'acme-*'; hosts, URLs and prefixes need an admin"
    )


def test_a_host_of_the_right_length_must_also_end_with_the_template() -> None:
    """'acme.other.example' is as long as acme's host but is not it: the ends must match."""
    with pytest.raises(PermissionDenied, match=re.escape("host 'acme.other.example'")):
        check_scope(parse_purge("host:acme.other.example"), user="acme", is_admin=False, rule=PAGES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"key_host": "pages.example"},
            "key_host 'pages.example' is invalid: it needs exactly one '{key}' and no other "
            "braces, like '{key}.pages.example'",
            id="key-host",
        ),
        pytest.param(
            {"owner_separator": ""},
            "owner_separator is empty; use a character such as '-'",
            id="separator",
        ),
    ],
)
def test_scope_rule_errors_are_whole(change: dict[str, str], message: str) -> None:
    """A bad ScopeRule setting is named with the fix, in full."""
    with pytest.raises(ConfigError) as caught:
        ScopeRule(**change)
    assert caught.value.message == message


def test_a_key_host_template_may_hold_any_letter() -> None:
    """Only braces are refused around '{key}': every letter, 'X' included, is allowed."""
    assert key_host_for(ScopeRule(key_host="{key}.X.example"), "acme") == "acme.x.example"


@pytest.mark.parametrize(
    ("rule", "hosts"),
    [
        pytest.param(PAGES, {"acme.pages.example", "bob-x.pages.example"}, id="key-host"),
        pytest.param(NO_HOSTS, set(), id="no-key-host"),
        pytest.param(None, set(), id="no-rule"),
    ],
)
def test_key_hosts_are_the_hosts_of_the_keys(rule: ScopeRule | None, hosts: set[str]) -> None:
    """Every key with a valid host under key_host gives that host; a key that has none, none."""
    purge = Purge(keys=frozenset({"acme", "Bob-X", "a_b"}), tags=frozenset({"tagged"}))
    assert key_hosts(purge, rule) == hosts


@pytest.mark.parametrize(
    ("prefix", "regex"),
    [
        pytest.param("/docs", r"^/docs([/?]|$)", id="boundary"),
        pytest.param("/docs/", "^/docs/", id="slash"),
        pytest.param("/", "^/", id="root"),
        pytest.param("", "^/", id="empty-is-root"),
        pytest.param("/a.b", r"^/a\.b([/?]|$)", id="escaped"),
    ],
)
def test_path_prefix_regex(prefix: str, regex: str) -> None:
    """The BAN regex for a prefix is anchored, escaped and keeps path_under's boundary."""
    assert path_prefix_regex(prefix) == regex


@pytest.mark.parametrize(
    ("uri", "prefix"),
    [("/docs", "/docs"), ("/docs/a", "/docs"), ("/docs?x", "/docs"), ("/docs2", "/docs"),
     ("/docs", "/docs/"), ("/docs/a", "/docs/"), ("/x", "/"), ("/x", ""), ("/a.b", "/a.b"),
     ("/axb", "/a.b")],
)  # fmt: skip
def test_path_prefix_regex_agrees_with_path_under(uri: str, prefix: str) -> None:
    """A request URI matches the regex exactly when its path is under the prefix."""
    path = uri.partition("?")[0]
    assert bool(re.match(path_prefix_regex(prefix), uri)) is path_under(path, prefix)


def test_an_empty_prefix_covers_every_path() -> None:
    """An empty prefix path is '/', so every path lies under it."""
    assert path_under("/anything", "")
    assert path_under("/", "")
