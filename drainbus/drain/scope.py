"""Who may purge what: the scope rules a non-admin's purges must keep to.

:class:`ScopeRule` says what a user owns besides the keys named after them (the hosts of
their keys, under ``drain.key_host``); :func:`check_scope` refuses a purge that reaches past
it, at ``pub`` and again in the drain. :func:`key_host_for` and :func:`key_hosts` map keys to
those hosts, which every target adds to a bare key's purge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from drainbus.drain.url_rules import hostname, is_dns_name
from drainbus.errors import ConfigError, PermissionDenied, quote_input
from drainbus.identity import user_key

if TYPE_CHECKING:  # purges re-exports this module's names, so it is imported for types only
    from drainbus.drain.purges import Purge

__all__ = ["ScopeRule", "check_scope", "key_host_for", "key_hosts"]


@dataclass(frozen=True, slots=True)
class ScopeRule:
    """What a non-admin user owns besides the keys named after them.

    A user owns the key equal to their name and every key starting with name +
    ``owner_separator``; the same goes for tags. ``key_host`` maps a key to its host name,
    e.g. ``"{key}.pages.example"``; a user owns the hosts of their keys. Without ``key_host``
    non-admins may not purge hosts, URLs or prefixes. Raises :class:`ConfigError` if
    ``key_host`` lacks exactly one ``{key}`` (or has other braces) or the separator is empty.
    """

    key_host: str | None = None
    owner_separator: str = "-"

    def __post_init__(self) -> None:
        template = self.key_host
        if template is not None and (
            # Any brace-free text in place of "{key}" would do: only braces left over count.
            template.count("{key}") != 1 or set("{}") & set(template.replace("{key}", ""))
        ):
            raise ConfigError(
                f"key_host {template!r} is invalid: it needs exactly one '{{key}}' and no "
                "other braces, like '{key}.pages.example'"
            )
        if not self.owner_separator:
            raise ConfigError("owner_separator is empty; use a character such as '-'")


def key_host_for(rule: ScopeRule, key: str) -> str | None:
    """Return the lower-case host name of ``key`` under ``rule.key_host``.

    Returns None when no ``key_host`` is configured or the result is not a valid DNS name
    (for a key containing '_', say): then the key is purged as a tag only.
    """
    if rule.key_host is None:
        return None
    host = rule.key_host.replace("{key}", key).lower()
    return host if is_dns_name(host) else None


def key_hosts(purge: Purge, rule: ScopeRule | None) -> frozenset[str]:
    """The hosts of ``purge.keys`` under ``rule.key_host`` (empty without a rule or key_host).

    A bare key means its tag AND its host on every target: nginx, HTTP PURGE caches and
    Cloudflare all add these hosts to the purge.
    """
    if rule is None:
        return frozenset()
    return frozenset(host for key in purge.keys if (host := key_host_for(rule, key)))


def check_scope(purge: Purge, *, user: str, is_admin: bool, rule: ScopeRule) -> None:
    """Return if ``user`` may publish ``purge``; raise :class:`PermissionDenied` if not.

    Admins may purge anything. Other users may purge the keys and tags they own (see
    :class:`ScopeRule`), and hosts, URLs and prefixes whose host is ``key_host`` of a key they
    own (host names compare case-insensitively). Only admins may purge everything.
    """
    if is_admin:
        return
    if purge.everything:
        raise PermissionDenied(
            "purge of everything refused: only admins may purge everything", user=user
        )
    sep = rule.owner_separator
    refused = [("key", key) for key in sorted(purge.keys) if not _owns(user, key, sep)]
    refused += [("tag", tag) for tag in sorted(purge.tags) if not _owns(user, tag, sep)]
    refused += [("host", host) for host in sorted(purge.hosts) if not _owns_host(user, host, rule)]
    refused += [
        (kind, url)
        for kind, urls in (("URL", purge.urls), ("prefix", purge.prefixes))
        for url in sorted(urls)
        if not _owns_host(user, hostname(url), rule)
    ]
    if refused:
        kind, item = refused[0]
        owned = f"user {user!r} may purge only keys {user!r} and {user + sep + '*'!r}"
        owned += " and their hosts" if rule.key_host else "; hosts, URLs and prefixes need an admin"
        raise PermissionDenied(f"purge of {kind} {quote_input(item)} refused: {owned}", user=user)


def _owns(user: str, name: str, sep: str) -> bool:
    # Regardless of case, as user names are unique that way and hosts and tags compare so.
    user, name, sep = user_key(user), user_key(name), user_key(sep)
    return bool(user) and (name == user or name.startswith(user + sep))


def _owns_host(user: str, host: str | None, rule: ScopeRule) -> bool:
    """Whether ``host`` is ``rule.key_host`` of some key ``user`` owns, ignoring case."""
    if rule.key_host is None or not host:
        return False
    # ScopeRule allows exactly one "{key}", so partition and rpartition split it alike.
    before, _, after = rule.key_host.lower().partition("{key}")
    host = host.lower()
    # The length test keeps the key non-empty; a shorter host that passed on would leave an
    # empty key, which no user owns, so '<' or a wrong sum here refuses the same hosts.
    if len(host) <= len(before) + len(after) or not (
        host.startswith(before) and host.endswith(after)
    ):
        return False
    key = host[len(before) : len(host) - len(after)]
    return _owns(user, key, rule.owner_separator)
