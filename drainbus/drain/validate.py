"""The check ``pub cache-drain`` runs on each line before storing it."""

from __future__ import annotations

import re
from collections.abc import Callable

from drainbus.drain.purges import parse_purge
from drainbus.drain.scope import ScopeRule, check_scope
from drainbus.errors import DataError
from drainbus.identity import Identity

__all__ = ["purge_line_check"]

_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # C0 but tab, DEL, C1


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
        # parse_purge strips surrounding whitespace, and str.strip counts some controls as
        # that (\x0b, \x0c, \x1c-\x1f, \x85): the stored line must hold none of them.
        if control := _CONTROL.search(text):
            raise DataError(
                f"a purge line may not contain control character {control[0]!r}; "
                "only tab and printable text"
            )
        purge = parse_purge(text)
        check_scope(purge, user=identity.user, is_admin=identity.is_admin, rule=rule)

    return check
