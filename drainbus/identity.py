"""Who is who: the server's host key and the users' public keys.

Users are files: ``users_dir/NAME.pub`` in OpenSSH authorized_keys format (one or more keys,
comments and blank lines allowed). NAME is the identity, whatever login name the client sends.
Options before a key are enforced as OpenSSH does (:mod:`drainbus.key_options`): ``from=``
and ``expiry-time=`` at login; a line with an option drainbus cannot honour (``command=``,
``cert-authority``, …) is refused at load with a logged reason, and the file's other keys
still count. A key listed for two different users belongs
to neither: it is refused and logged, because guessing would hand one user the other's rights.

User names are unique regardless of case: ``acme`` and ``ACME`` are one user, and every
check compares names through :func:`user_key`. A second file spelling a loaded user's name
differently is refused and logged; two such files at start-up are a ConfigError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import structlog
from asyncssh.public_key import decode_ssh_public_key

from drainbus.errors import ConfigError, UsageError
from drainbus.folder_watch import FolderWatch
from drainbus.key_options import KeyOptionError, KeyOptions, parse_key_options

__all__ = [
    "HOST_KEY_NAME",
    "MIN_RSA_BITS",
    "AuthorizedKey",
    "Identity",
    "UserKeys",
    "load_or_create_host_key",
    "name_conflict",
    "parse_authorized_keys",
    "read_authorized_keys",
    "same_user",
    "user_key",
    "valid_user_name",
    "weak_key_reason",
]

log = structlog.get_logger(__name__)

HOST_KEY_NAME = "ssh_host_ed25519_key"
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_TYPES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")


MIN_RSA_BITS = 2048
"""RSA keys shorter than this are refused, at load and at login (NIST's floor since 2015)."""
_LOGIN_KEY_TYPES = frozenset(
    {  # what OpenSSH 10 accepts for user keys (PubkeyAcceptedAlgorithms, by key type)
        b"ssh-ed25519",
        b"ecdsa-sha2-nistp256",
        b"ecdsa-sha2-nistp384",
        b"ecdsa-sha2-nistp521",
        b"sk-ssh-ed25519@openssh.com",
        b"sk-ecdsa-sha2-nistp256@openssh.com",
        b"ssh-rsa",
    }
)


def weak_key_reason(key: asyncssh.SSHKey) -> str | None:
    """Why ``key`` is too weak to log in with (DSA, RSA under 2048 bits, a type OpenSSH no
    longer accepts); None for a key drainbus accepts."""
    if key.algorithm == b"ssh-dss":
        return "DSA keys are refused (1024 bits and SHA-1; OpenSSH 10 removed them)"
    if key.algorithm not in _LOGIN_KEY_TYPES:
        return f"{key.algorithm.decode('ascii', 'replace')} keys are not accepted (as in OpenSSH)"
    bits = int(getattr(key.pyca_key, "key_size", 0)) if key.algorithm == b"ssh-rsa" else 0
    if key.algorithm == b"ssh-rsa" and bits < MIN_RSA_BITS:
        return f"RSA keys need at least {MIN_RSA_BITS} bits; this one has {bits}"
    return None


def name_conflict(
    name: str, users: Iterable[str], acl_topics: Iterable[str], owner_separator: str | None
) -> str | None:
    """Why user ``name`` would own what is not its own; None if it would not.

    A user owns the topics ``NAME`` and ``NAME/…`` and, with ``owner_separator`` (the drain's,
    ``-``), the purge keys ``NAME-…``. So ``name`` may not be (or, through a ``*`` in the
    first segment, match) the first segment of a topic or glob in ``acl_topics`` (a rule
    governs those topics, and owning them would bypass it), nor fall inside another user's
    keys (``mallory-corp`` next to ``mallory``), nor take an existing user's name inside its
    own keys (``acme`` next to ``acme-blog``). Names compare regardless of case.
    """
    own = user_key(name)
    for topic in acl_topics:
        head = topic.split("/", 1)[0]
        if head.strip("*") and _segment_glob(head).fullmatch(own):
            return (
                f"it would own topic '{topic}' as its own namespace ('{name}' and "
                f"'{name}/…'), but an [[acl]] rule or the drain governs that topic"
            )
    if owner_separator:
        sep = user_key(owner_separator)
        for user in users:
            other = user_key(user)
            if own.startswith(other + sep):
                return (
                    f"it falls inside user '{user}''s scope: '{user}' may purge every key "
                    f"'{user}{owner_separator}…'"
                )
            if other.startswith(own + sep):
                return (
                    f"its scope would cover user '{user}': '{name}' could purge every key "
                    f"'{name}{owner_separator}…'"
                )
    return None


def _segment_glob(segment: str) -> re.Pattern[str]:
    """A topic glob's first segment (``*`` any run of characters) as a regex, for user keys."""
    return re.compile(".*".join(re.escape(user_key(part)) for part in segment.split("*")))


def valid_user_name(name: str) -> bool:
    """True for names usable as an identity: letters, digits, '.', '_', '-', at most 64."""
    return bool(_USER_NAME.fullmatch(name))


def user_key(name: str) -> str:
    """The form user names are compared in: ``acme``, ``ACME`` and ``Acme`` are one user."""
    return name.casefold()


def same_user(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name the same user (case is ignored)."""
    return user_key(a) == user_key(b)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated user: the name from the key file and the key's SHA256 fingerprint."""

    user: str
    fingerprint: str
    is_admin: bool


def load_or_create_host_key(directory: Path) -> asyncssh.SSHKey:
    """Read ``directory/ssh_host_ed25519_key``, generating it (mode 0600) if missing.

    Raises ConfigError if the file exists but cannot be read or parsed.
    """
    path = directory / HOST_KEY_NAME
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        # O_EXCL: two nodes starting at once on a shared folder must not overwrite each other.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another node wrote it since exists(): a race no test can stage
            return load_or_create_host_key(directory)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.export_private_key())
        path.with_suffix(".pub").write_bytes(key.export_public_key())
        log.info("host_key_generated", path=str(path))
        return key
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"host key {path} cannot be read: {exc}") from None


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    """One key line: its key, what its options require at login, or why it is refused."""

    key: asyncssh.SSHKey
    line: int
    options: KeyOptions
    refusal: str | None = None  # set: this line gives no login, for this reason


def read_authorized_keys(text: str, *, source: str) -> list[AuthorizedKey]:
    """Every key line of authorized_keys ``text``, in order, refused ones included.

    Raises ConfigError naming the line when a line holds no valid public key; a line whose
    options drainbus refuses or cannot read is returned with its ``refusal``.
    """
    keys: list[AuthorizedKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        start = next(
            (
                m.start()
                for m in re.finditer(r"(?:^|\s)(\S+)", line)
                if m.group(1).startswith(_KEY_TYPES)
            ),
            None,
        )
        if start is None:
            raise ConfigError(f"{source}:{number}: no public key found on this line")
        options, refusal = KeyOptions(), None
        if start > 0:
            try:
                options, rest = parse_key_options(line)
            except KeyOptionError as exc:
                refusal, rest = str(exc), line[start:]
        else:
            rest = line
        try:
            key = asyncssh.import_public_key(rest.strip())
        except asyncssh.KeyImportError as exc:
            raise ConfigError(f"{source}:{number}: not a valid public key ({exc})") from None
        refusal = refusal or weak_key_reason(key)
        keys.append(AuthorizedKey(key, number, options, refusal))
    return keys


def parse_authorized_keys(text: str, *, source: str) -> list[asyncssh.SSHKey]:
    """The keys of authorized_keys text, refused lines included (see read_authorized_keys).

    Raises ConfigError naming the line that holds no valid key."""
    return [entry.key for entry in read_authorized_keys(text, source=source)]


def _read_user_file(
    path: Path, user: str, options: dict[bytes, list[KeyOptions]]
) -> list[asyncssh.SSHKey]:
    """The usable keys of ``user``'s file (logging each refused one); each usable line's
    options added to ``options``. Raises what reading or parsing the file raises."""
    keys = []
    for entry in read_authorized_keys(path.read_text(), source=str(path)):
        if entry.refusal is not None:
            log.error(
                "key_refused", path=str(path), line=entry.line, user=user,
                fingerprint=entry.key.get_fingerprint(), reason=entry.refusal,
            )  # fmt: skip
            continue
        keys.append(entry.key)
        options.setdefault(entry.key.public_data, []).append(entry.options)
    return keys


def _index_by_key(by_user: dict[str, list[asyncssh.SSHKey]]) -> dict[bytes, tuple[str, str]]:
    """Key -> (user, fingerprint), leaving out (and logging) keys that several users list."""
    owners: dict[bytes, set[str]] = {}
    for user, keys in by_user.items():
        for key in keys:
            owners.setdefault(key.public_data, set()).add(user)
    by_key: dict[bytes, tuple[str, str]] = {}
    for user, keys in by_user.items():
        for key in keys:
            if len(owners[key.public_data]) == 1:
                by_key[key.public_data] = (user, key.get_fingerprint("sha256"))
    for data, names in owners.items():
        if len(names) > 1:
            log.error(
                "key_refused_shared", users=sorted(names),
                fingerprint=decode_ssh_public_key(data).get_fingerprint(),
            )  # fmt: skip
    return by_key


class UserKeys:
    """The users folder, indexed by key, reloaded when its files change.

    ``lookup`` is what authentication calls; ``reload_if_changed`` is cheap (one stat per
    file) and is called periodically and on SIGHUP. A file that fails to parse keeps the
    user's previous keys and logs the error, so a typo never locks everyone out.
    """

    def __init__(self, directory: Path, admins: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.admins = frozenset(user_key(name) for name in admins)
        self._by_key: dict[bytes, tuple[str, str]] = {}
        self._options: dict[bytes, tuple[KeyOptions, ...]] = {}  # one per line listing the key
        self._by_user: dict[str, list[asyncssh.SSHKey]] = {}
        self._watch = FolderWatch(directory, ".pub")
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every reload (to drop connections whose key is gone)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback``; a no-op if it was not added."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    @property
    def users(self) -> dict[str, list[asyncssh.SSHKey]]:
        """User name -> keys, as last loaded."""
        return dict(self._by_user)

    def lookup(self, key: asyncssh.SSHKey) -> Identity | None:
        """The identity owning ``key``, or None if no user (or more than one) lists it."""
        found = self._by_key.get(key.public_data)
        if found is None:
            return None
        user, fingerprint = found
        return Identity(user=user, fingerprint=fingerprint, is_admin=user_key(user) in self.admins)

    def refusal(self, key: asyncssh.SSHKey, address: str, now: float | None = None) -> str | None:
        """Why the key line's options refuse a login from ``address`` at ``now``; None when
        one of the lines listing ``key`` allows it (as OpenSSH reads its lines)."""
        reasons = [o.refusal(address, now) for o in self._options.get(key.public_data, ())]
        return None if None in reasons else reasons[0] if reasons else "unknown key"

    def reload_if_changed(self) -> bool:
        """Reload when a file was added, removed or changed. Returns True if it reloaded."""
        if not self._watch.changed():
            return False
        self.reload()
        return True

    def load(self) -> None:
        """First load at start-up: any unreadable or invalid key file is a ConfigError."""
        self._watch.changed()  # what is loaded now is what the next check compares with
        self.reload(strict=True)

    def reload(self, *, strict: bool = False) -> None:
        """Read every ``NAME.pub`` again and rebuild the index.

        ``strict`` (used at start-up) raises ConfigError for an unreadable or invalid file
        instead of logging it and keeping that user's previous keys.
        """
        by_user: dict[str, list[asyncssh.SSHKey]] = {}
        options: dict[bytes, list[KeyOptions]] = {}
        for path in sorted(self.directory.glob("*.pub")):
            user = path.stem
            if not valid_user_name(user):
                log.warning("user_file_ignored", path=str(path), reason="invalid user name")
                continue
            try:
                by_user[user] = _read_user_file(path, user, options)
            except (OSError, UnicodeDecodeError, ConfigError) as exc:
                if strict:
                    raise ConfigError(f"user key file {path} cannot be used: {exc}") from None
                log.error(  # noqa: TRY400 - the reason is in the message; a traceback adds nothing
                    "user_file_unreadable", path=str(path), error=str(exc)
                )
                self._keep_previous(user, by_user, options)
        by_user = self._without_name_clashes(by_user, strict=strict)
        by_key = _index_by_key(by_user)
        self._by_user, self._by_key = by_user, by_key
        self._options = {data: tuple(options[data]) for data in by_key}
        log.info("users_loaded", users=len(by_user), keys=len(by_key))
        for callback in tuple(self._listeners):
            callback()

    def _keep_previous(
        self,
        user: str,
        by_user: dict[str, list[asyncssh.SSHKey]],
        options: dict[bytes, list[KeyOptions]],
    ) -> None:
        """Keep ``user``'s keys as loaded before, their file being unreadable now."""
        if user in self._by_user:
            by_user[user] = self._by_user[user]
            for key in by_user[user]:
                options[key.public_data] = list(self._options.get(key.public_data, ()))

    def _without_name_clashes(
        self, by_user: dict[str, list[asyncssh.SSHKey]], *, strict: bool
    ) -> dict[str, list[asyncssh.SSHKey]]:
        """Drop files that spell one user's name in several ways (``acme``, ``ACME``).

        The spelling loaded before keeps its keys; a newcomer is refused. With no such
        spelling all are refused, and at start-up (``strict``) it is a ConfigError.
        """
        spellings: dict[str, list[str]] = {}
        for user in by_user:
            spellings.setdefault(user_key(user), []).append(user)
        kept = dict(by_user)
        for names in spellings.values():
            if len(names) < 2:
                continue
            files = ", ".join(f"{name}.pub" for name in names)
            if strict:
                raise ConfigError(
                    f"user files {files} in {self.directory} name the same user: user names "
                    "are unique regardless of case; remove all but one"
                )
            # At most one spelling was loaded (a clash is never loaded): [:1] or [:2] alike.
            loaded = [name for name in names if name in self._by_user]
            refused = [name for name in names if name not in loaded[:1]]
            for name in refused:
                del kept[name]
            log.error(
                "user_name_clash", files=files, kept=loaded[:1], refused=sorted(refused),
                reason="user names are unique regardless of case",
            )  # fmt: skip
        return kept

    def add(
        self,
        name: str,
        text: str,
        *,
        source: str,
        acl_topics: Iterable[str] = (),
        owner_separator: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Give user ``name`` the public keys in ``text`` (authorized_keys lines).

        Appends the new ones to ``NAME.pub`` (creating the folder and file as needed) and
        returns ``(fingerprint, added)`` per key, ``added`` False for a key the user had.
        Nothing is written when any check fails: UsageError for an invalid name, one that
        differs only in case from an existing user, or one that would own what is not its
        own (see :func:`name_conflict`: ``acl_topics`` are the topics and globs the config's
        rules govern, the drain topic among them; ``owner_separator`` is the drain's);
        ConfigError for no key in ``text``, an unparsable or refused line, or a key that
        belongs to another user. ``source`` names ``text`` in messages.
        """
        if not valid_user_name(name):
            raise UsageError(
                f"user name '{name}' is invalid: use 1-64 letters, digits, '.', '_', '-'"
            )
        entries = read_authorized_keys(text, source=source)
        if not entries:
            raise ConfigError(f"{source} holds no public key")
        for entry in entries:
            if entry.refusal is not None:
                raise ConfigError(
                    f"{source}:{entry.line}: key {entry.key.get_fingerprint()} refused: "
                    f"{entry.refusal}"
                )
        new_keys = [entry.key for entry in entries]
        self.reload()
        clash = next((u for u in self._by_user if same_user(u, name) and u != name), None)
        if clash is not None:
            raise UsageError(
                f"user '{clash}' already exists: user names are unique regardless of case, "
                f"so '{name}' would be the same user; add the key to '{clash}' instead"
            )
        others = [p.stem for p in self.directory.glob("*.pub") if valid_user_name(p.stem)]
        conflict = name_conflict(
            name, [u for u in others if u != name], acl_topics, owner_separator
        )
        if conflict is not None:
            raise UsageError(f"user name '{name}' is refused: {conflict}")
        for key in new_keys:
            owner = self.lookup(key)
            if owner is not None and owner.user != name:
                raise ConfigError(
                    f"key {key.get_fingerprint()} already belongs to user '{owner.user}'"
                )
        existing = {k.public_data for k in self._by_user.get(name, [])}
        results, lines = [], []
        # _key_lines reads the lines parse_authorized_keys read: strict only guards that.
        for key, line in zip(new_keys, _key_lines(text), strict=True):
            added = key.public_data not in existing
            existing.add(key.public_data)
            results.append((key.get_fingerprint(), added))
            if added:
                lines.append(line)
        if lines:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{name}.pub"
            # A hand-edited file may lack its final newline: don't glue a key onto its last line.
            current = path.read_text() if path.exists() else ""
            separator = "\n" if current and not current.endswith("\n") else ""
            with path.open("a") as handle:
                handle.write(separator + "".join(f"{line}\n" for line in lines))
        return results

    def remove(self, name: str, fingerprint: str | None = None) -> None:
        """Remove user ``name`` (their file), or only their key with ``fingerprint``.

        Raises UsageError when there is no such user or key. Connections of a removed key are
        closed at the next reload of a running bus.
        """
        path = self.directory / f"{name}.pub"
        if not valid_user_name(name) or not path.exists():
            raise UsageError(f"no user '{name}' in {self.directory}")
        if fingerprint is None:
            path.unlink()
            return
        text = path.read_text()
        read_authorized_keys(text, source=str(path))  # a bad line: ConfigError naming its number
        kept, removed = [], 0
        for line in text.splitlines():
            # (A blank line parses to no key anyway: the test only saves the call.)
            parsed = parse_authorized_keys(line, source=str(path)) if line.strip() else []
            if parsed and parsed[0].get_fingerprint() == fingerprint:
                removed += 1  # only its truth is read: any non-zero count would do
                continue
            kept.append(line)
        if not removed:
            raise UsageError(f"user '{name}' has no key {fingerprint}")
        path.write_text("".join(f"{line}\n" for line in kept))


def _key_lines(text: str) -> list[str]:
    """The key lines of authorized_keys ``text``, in the order parse_authorized_keys reads them."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
