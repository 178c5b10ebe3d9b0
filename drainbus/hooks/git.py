"""``drainbus hook git``: a git ``post-receive`` hook that purges the sites of pushed branches.

git runs ``post-receive`` once per push, after the refs were updated, with one
``OLD NEW REF`` line per updated ref on stdin. Every ref named in ``hooks.branches`` (or by
``--branch``) that was created or moved adds its purge lines; deleted refs (NEW all zeros)
add nothing. The lines go to the bus in one ``pub`` and the hook exits with that ``pub``'s
exit code; the server's stderr is passed through, so the pusher sees it as ``remote: …``.
A push may already have succeeded when the hook fails: git does not undo it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from drainbus.errors import DataError
from drainbus.hooks.client import BusClient, PublishResult
from drainbus.hooks.settings import HooksSettings

__all__ = ["RefUpdate", "parse_ref_updates", "publish_pushed", "purges_for"]


@dataclass(frozen=True, slots=True)
class RefUpdate:
    """One line of post-receive input: a ref moved from ``old`` to ``new`` (object names)."""

    old: str
    new: str
    ref: str

    @property
    def deleted(self) -> bool:
        """True when the push deleted the ref (the new object name is all zeros)."""
        return set(self.new) == {"0"}


def parse_ref_updates(text: str) -> list[RefUpdate]:
    """Parse post-receive's stdin. Raises :class:`DataError` naming a malformed line."""
    updates = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3 or not all(_is_object_name(f) for f in fields[:2]):
            raise DataError(
                f"post-receive line {number} is {line!r}; expected 'OLD NEW REF' as git "
                "gives it (run this as a post-receive hook)"
            )
        updates.append(RefUpdate(*fields))
    return updates


def _is_object_name(value: str) -> bool:
    return len(value) in (40, 64) and all(c in "0123456789abcdef" for c in value)


def purges_for(updates: Iterable[RefUpdate], branches: Mapping[str, Sequence[str]]) -> list[str]:
    """The purge lines for the refs that were created or moved, each once, in push order."""
    lines: dict[str, None] = {}
    for update in updates:
        if not update.deleted:
            lines.update(dict.fromkeys(branches.get(update.ref, ())))
    return list(lines)


async def publish_pushed(
    settings: HooksSettings,
    text: str,
    *,
    stderr: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
) -> PublishResult | None:
    """Publish the purges for the post-receive input ``text`` to ``settings.topic``.

    Returns None when no configured branch was pushed (nothing is sent), else how the
    server's ``pub`` ended (its stderr also copied to ``stderr``; with ``settings.wait``, the
    purge receipts to ``stdout``, which git shows the pusher). Raises DataError for
    malformed input, ConfigError for an unusable key file and
    :class:`~drainbus.hooks.client.BusUnreachable`.
    """
    lines = purges_for(parse_ref_updates(text), settings.branches)
    if not lines:
        return None
    async with BusClient(settings).connect() as session:
        return await session.publish(
            settings.topic, lines, stderr=stderr, stdout=stdout, wait=settings.wait
        )
