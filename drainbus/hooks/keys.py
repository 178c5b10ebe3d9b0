"""Which site key a changed path belongs to: ``{0}-{1}`` over the path below the watched folder.

A template names path segments by position: with ``{0}-{1}``, a change anywhere under
``/srv/sites/acme/blog/`` (watched folder ``/srv/sites``) is a change of ``acme-blog``. A path
with fewer segments than the template uses (``/srv/sites/acme``) belongs to no key.

Every segment a template uses must look like a key itself (a letter or digit, then letters,
digits, ``.``, ``_``, ``-``, the purge grammar's key characters), so hidden folders
(``.git``, ``.well-known``) and names with spaces are never sites; and the rendered key must be
a bare key of the purge grammar, so a folder can never turn into ``*`` or ``url:…``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from drainbus.drain.purges import Purge, parse_purge
from drainbus.errors import DataError, UsageError

__all__ = ["KeyTemplate"]

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXAMPLE = "{0}-{1} (first two folders below the watched one)"


class KeyTemplate:
    """A ``str.format`` template over numbered path segments, e.g. ``{0}-{1}``.

    Raises :class:`UsageError` naming the problem when the template uses anything but
    ``{N}`` placeholders, uses none, or cannot render a bare purge key.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        indices: list[int] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise UsageError(f"key template {template!r} is malformed: {exc}") from None
        for _literal, field, spec, conversion in parsed:
            if field is None:
                continue
            if not field.isdigit() or spec or conversion:
                shown = "{" + field + (f"!{conversion}" if conversion else "") + "}"
                raise UsageError(
                    f"key template {template!r}: placeholder {shown} is not a segment number; "
                    f"use {{0}}, {{1}}, … like {_EXAMPLE}"
                )
            indices.append(int(field))
        if not indices:
            raise UsageError(f"key template {template!r} uses no path segment; try {_EXAMPLE}")
        self.depth = max(indices) + 1
        """How many segments below the watched folder a path needs to have a key."""
        sample = self._render(["a"] * self.depth)
        if sample is None:
            raise UsageError(
                f"key template {template!r} does not make a bare site key (letters, digits, "
                f"'.', '_', '-'); try {_EXAMPLE}"
            )

    def key_for(self, parts: Sequence[str]) -> str | None:
        """The key of a path given as its segments below the watched folder, or None.

        None when the path is not deep enough or a segment the template uses is not a valid
        key piece (hidden folders, spaces, other characters).
        """
        if len(parts) < self.depth:
            return None
        used = parts[: self.depth]
        if not all(_SEGMENT.fullmatch(part) for part in used):
            return None
        return self._render(used)

    def _render(self, parts: Sequence[str]) -> str | None:
        key = self.template.format(*parts)
        try:
            purge = parse_purge(key)
        except DataError:
            return None
        return key if purge == Purge(keys=frozenset({key})) else None

    def __repr__(self) -> str:
        return f"KeyTemplate({self.template!r})"
