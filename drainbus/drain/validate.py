"""The check ``pub cache-drain`` runs on each line before storing it."""

from __future__ import annotations

from collections.abc import Callable

from drainbus.drain.purges import ScopeRule, check_scope, parse_purge
from drainbus.errors import DataError
from drainbus.identity import Identity

__all__ = ["purge_line_check"]


def purge_line_check(rule: ScopeRule) -> Callable[[Identity, bytes], None]:
    """A line check that accepts only well-formed purges the publisher may issue.

    Raises DataError (exit 65) for a malformed line, PermissionDenied (77) for a purge
    outside the publisher's scope.
    """

    def check(identity: Identity, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("a purge line must be UTF-8 text") from None
        purge = parse_purge(text)
        check_scope(purge, user=identity.user, is_admin=identity.is_admin, rule=rule)

    return check
