"""API tokens for the HTTP endpoint: a token is a user exactly as an SSH key is.

``drainbus tokens add NAME`` makes a token for user ``NAME``, prints it once and stores only
its SHA-256 in ``users_dir/NAME.tokens``, one line per token::

    sha256:<64 hex digits> <created, RFC 3339>

The token holds 256 random bits, so a plain SHA-256 is enough to store it: nobody can guess
their way back from the hash, and no slow hash is needed against a dictionary. Lookups
compare hashes in constant time. The short id (``sha256:`` and 12 hex digits) names a token
in ``tokens ls`` and ``tokens rm`` and in log lines; the token itself is never logged.

A running bus re-reads the files when they change (with the users folder, every
``server.users_reload_interval``), so a removed token stops working without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from drainbus.errors import UsageError
from drainbus.folder_watch import FolderWatch
from drainbus.identity import Identity, name_conflict, same_user, user_key, valid_user_name

__all__ = ["TOKEN_PREFIX", "StoredToken", "TokenStore", "hash_token"]

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "dbt_"  # noqa: S105 - a prefix, not a secret
"""Every token starts so, which makes a leaked one easy to find with a secret scanner."""

_SUFFIX = ".tokens"
_LINE = re.compile(r"sha256:([0-9a-f]{64})(?:\s+(\S+))?\s*")
_ID_DIGITS = 12


def hash_token(token: str) -> str:
    """The hex SHA-256 of ``token``, as stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredToken:
    """One stored token: its user, hash and creation time (as written)."""

    user: str
    digest: str
    created: str

    @property
    def id(self) -> str:
        """The short name of the token: ``sha256:`` and the first 12 hex digits of its hash."""
        return f"sha256:{self.digest[:_ID_DIGITS]}"


class TokenStore:
    """The ``*.tokens`` files of the users folder, reloaded when they change."""

    def __init__(self, directory: Path, admins: Iterable[str] = ()) -> None:
        self.directory = directory
        self.admins = frozenset(user_key(name) for name in admins)
        self._tokens: tuple[StoredToken, ...] = ()
        self._watch = FolderWatch(directory, _SUFFIX)

    @property
    def tokens(self) -> tuple[StoredToken, ...]:
        """Every token as last loaded, by user then creation."""
        return self._tokens

    def lookup(self, token: str) -> Identity | None:
        """The identity ``token`` belongs to, or None for an unknown token."""
        digest = hash_token(token).encode()
        found = None
        for stored in self._tokens:  # every one compared: the time taken tells nothing
            if hmac.compare_digest(stored.digest.encode(), digest):
                found = stored
        if found is None:
            return None
        return Identity(found.user, found.id, user_key(found.user) in self.admins)

    def reload_if_changed(self) -> bool:
        """Reload when a tokens file was added, removed or changed; True if it reloaded."""
        if not self._watch.changed():
            return False
        self.reload()
        return True

    def reload(self) -> None:
        """Read every ``NAME.tokens`` again. A line that is not a stored token is skipped and
        logged (``token_line_refused``): it cannot be a token, only a hand edit gone wrong."""
        tokens = []
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            user = path.name.removesuffix(_SUFFIX)
            if not valid_user_name(user):
                log.warning("token_file_refused", file=str(path), reason="not a user name")
                continue
            try:
                text = path.read_text()
            except OSError as exc:
                log.warning("token_file_refused", file=str(path), reason=exc.strerror)
                continue
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                match = _LINE.fullmatch(line.strip())
                if match is None:
                    log.warning("token_line_refused", file=str(path), line=number)
                    continue
                tokens.append(StoredToken(user, match[1], match[2] or ""))
        self._tokens = tuple(tokens)

    def add(self, name: str, *, acl_topics: Iterable[str], owner_separator: str | None) -> str:
        """Make a new token for user ``name``, store its hash, and return the token.

        A user new to the folder (no key, no token yet) is checked as ``keys add`` checks a
        new name: raises UsageError for a name that is invalid, differs only in case from an
        existing user, or would own what is not its own.
        """
        if not valid_user_name(name):
            raise UsageError(
                f"user name {name!r} is invalid: use letters, digits, '.', '_' and '-' "
                "(at most 64, starting with a letter or digit)"
            )
        users = self._folder_users()
        clash = next((u for u in users if same_user(u, name) and u != name), None)
        if clash is not None:
            raise UsageError(
                f"user '{clash}' already exists: user names are unique regardless of case; "
                f"give the token to '{clash}'"
            )
        if name not in users:
            conflict = name_conflict(name, users, acl_topics, owner_separator)
            if conflict is not None:
                raise UsageError(f"user name '{name}' is refused: {conflict}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}{_SUFFIX}"
        # Only hashes, yet nobody else needs to read them.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(f"sha256:{hash_token(token)} {created}\n")
        return token

    def remove(self, name: str, token_id: str | None = None) -> int:
        """Remove every token of ``name``, or only the one with ``token_id``; return how many.

        Raises UsageError when the user has no token (or none with that id).
        """
        path = self.directory / f"{name}{_SUFFIX}"
        if not valid_user_name(name) or not path.exists():
            raise UsageError(f"user '{name}' has no token in {self.directory}")
        if token_id is None:
            self.reload()
            count = sum(1 for t in self._tokens if t.user == name)
            path.unlink()
            return count
        kept = []
        removed = 0
        for line in path.read_text().splitlines():
            match = _LINE.fullmatch(line.strip())
            if match and f"sha256:{match[1][:_ID_DIGITS]}" == token_id:
                removed += 1
                continue
            kept.append(line)
        if not removed:
            raise UsageError(f"user '{name}' has no token {token_id} (see drainbus tokens ls)")
        path.write_text("".join(f"{line}\n" for line in kept))
        return removed

    def _folder_users(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        stems = {n.rsplit(".", 1)[0] for n in names if n.endswith((".pub", _SUFFIX))}
        return sorted(s for s in stems if valid_user_name(s))
