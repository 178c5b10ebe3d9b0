"""Host key, authorized_keys parsing, and the users folder as an index of keys."""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import asyncssh
import pytest
from structlog.testing import capture_logs

from drainbus.errors import ConfigError, ExitCode
from drainbus.identity import (
    HOST_KEY_NAME,
    Identity,
    UserKeys,
    load_or_create_host_key,
    parse_authorized_keys,
    valid_user_name,
)


class PublicKey(NamedTuple):
    """One generated key: its authorized_keys line and the parsed key."""

    line: str
    key: asyncssh.SSHKey

    @property
    def fingerprint(self) -> str:
        return self.key.get_fingerprint("sha256")


NewKey = Callable[..., PublicKey]


@pytest.fixture
def new_key(make_key: Callable[[str], Path]) -> NewKey:
    """A fresh ed25519 key from the real ssh-keygen (conftest's make_key), comment = label."""
    numbers = itertools.count()

    def make(label: str | None = None) -> PublicKey:
        private = make_key(label or f"key{next(numbers)}")
        line = Path(f"{private}.pub").read_text().strip()
        return PublicKey(line, asyncssh.import_public_key(line))

    return make


def write_user(users_dir: Path, name: str, *lines: str) -> Path:
    path = users_dir / f"{name}.pub"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def later(path: Path) -> None:
    """Move the file's mtime a second on, as a real edit a moment after the last scan would.

    The folder is polled by (mtime, size); two writes inside one filesystem clock tick with the
    same size are indistinguishable by design.
    """
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


# --- parse_authorized_keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{key}", id="plain"),
        pytest.param("   {key}   ", id="surrounding-spaces"),
        pytest.param('from="1.2.3.4",no-pty {key}', id="options"),
        pytest.param('environment="A=hi there",no-pty,from="10.0.0.0/8" {key}', id="quoted-spaces"),
        pytest.param("restrict {key}", id="single-option"),
    ],
)
def test_parse_one_key_line(new_key: NewKey, template: str) -> None:
    """A key line is parsed with or without options before it (test_key_options: what they do)."""
    pub = new_key("c")

    keys = parse_authorized_keys(template.format(key=pub.line), source="alice.pub")

    assert [k.public_data for k in keys] == [pub.key.public_data]
    assert keys[0].get_comment() == "c"


def test_parse_file_with_comments_blank_lines_and_several_keys(new_key: NewKey) -> None:
    """Comments and blank lines are skipped; every key line counts, in file order."""
    first, second, third = new_key("laptop"), new_key("desktop"), new_key("ci")
    text = "\n".join(
        [
            "# alice's keys",
            "",
            first.line,
            "   # indented comment",
            "\t",
            f'from="1.2.3.4",no-pty {second.line}',
            third.line,
            "",
        ]
    )

    keys = parse_authorized_keys(text, source="alice.pub")

    assert [k.public_data for k in keys] == [
        first.key.public_data,
        second.key.public_data,
        third.key.public_data,
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("\n\n   \n", id="blank"),
        pytest.param("# nobody yet\n", id="comment-only"),
    ],
)
def test_parse_no_keys(text: str) -> None:
    """A file without key lines parses to no keys, not an error."""
    assert parse_authorized_keys(text, source="alice.pub") == []


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        pytest.param("this is not a key", "no public key found", id="no-key-type"),
        pytest.param("ssh-ed25519", "not a valid public key", id="type-without-data"),
        pytest.param("ssh-ed25519 AAAA", "not a valid public key", id="truncated"),
        pytest.param("ssh-ed25519 !!not-base64!!", "not a valid public key", id="not-base64"),
    ],
)
def test_parse_garbage_line_names_file_and_line(new_key: NewKey, garbage: str, reason: str) -> None:
    """A line that is neither comment, blank nor key is a ConfigError naming file:line."""
    text = f"# keys\n{new_key().line}\n{garbage}\n"

    with pytest.raises(ConfigError) as caught:
        parse_authorized_keys(text, source="users/alice.pub")

    assert str(caught.value).startswith(f"users/alice.pub:3: {reason}")


# --- user names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        pytest.param("alice", True, id="plain"),
        pytest.param("web-01.eu_west", True, id="punctuation"),
        pytest.param("a" * 64, True, id="64-chars"),
        pytest.param("a" * 65, False, id="65-chars"),
        pytest.param("", False, id="empty"),
        pytest.param("-alice", False, id="leading-dash"),
        pytest.param(".hidden", False, id="leading-dot"),
        pytest.param("al ice", False, id="space"),
        pytest.param("../alice", False, id="path"),
        pytest.param("alice\n", False, id="trailing-newline"),
        pytest.param("@admins", False, id="principal"),
    ],
)
def test_valid_user_name(name: str, valid: bool) -> None:
    """User names are 1-64 letters, digits, '.', '_', '-', starting with a letter or digit."""
    assert valid_user_name(name) is valid


# --- UserKeys: loading and lookup -----------------------------------------------------------


def test_lookup_returns_user_fingerprint_and_admin_flag(users_dir: Path, new_key: NewKey) -> None:
    """lookup() maps a key to its file's user, the key's SHA256 fingerprint and admin status."""
    alice_laptop, alice_ci, bob = new_key(), new_key(), new_key()
    write_user(users_dir, "alice", alice_laptop.line, alice_ci.line)
    write_user(users_dir, "bob", bob.line)
    users = UserKeys(users_dir, admins=("alice",))

    users.load()

    assert users.lookup(alice_laptop.key) == Identity("alice", alice_laptop.fingerprint, True)
    assert users.lookup(alice_ci.key) == Identity("alice", alice_ci.fingerprint, True)
    assert users.lookup(bob.key) == Identity("bob", bob.fingerprint, False)
    assert bob.fingerprint.startswith("SHA256:")
    assert users.lookup(new_key().key) is None
    assert sorted(users.users) == ["alice", "bob"]


def test_load_is_strict(users_dir: Path, new_key: NewKey) -> None:
    """At start-up an invalid user file is a ConfigError naming the file and the line."""
    write_user(users_dir, "alice", new_key().line)
    bad = write_user(users_dir, "bob", "# bob", "ssh-ed25519 AAAA")

    with pytest.raises(ConfigError) as caught:
        UserKeys(users_dir).load()

    assert caught.value.exit_code == ExitCode.CONFIG
    assert str(caught.value).startswith(f"user key file {bad} cannot be used: {bad}:2: ")


def test_missing_users_folder_means_no_users(tmp_path: Path, new_key: NewKey) -> None:
    """A users folder that doesn't exist yet holds no users; it is not an error."""
    users = UserKeys(tmp_path / "not-yet")

    users.load()

    assert users.users == {}
    assert users.lookup(new_key().key) is None


def test_key_listed_for_two_users_is_refused_for_both(users_dir: Path, new_key: NewKey) -> None:
    """A key in two users' files authenticates neither; their other keys still work."""
    shared, alice_own, bob_own = new_key(), new_key(), new_key()
    write_user(users_dir, "alice", shared.line, alice_own.line)
    write_user(users_dir, "bob", bob_own.line, shared.line)
    users = UserKeys(users_dir)

    users.load()

    assert users.lookup(shared.key) is None
    assert users.lookup(alice_own.key) == Identity("alice", alice_own.fingerprint, False)
    assert users.lookup(bob_own.key) == Identity("bob", bob_own.fingerprint, False)


@pytest.mark.parametrize(
    "file_name",
    [
        pytest.param("-dash.pub", id="leading-dash"),
        pytest.param(".hidden.pub", id="dotfile"),
        pytest.param("two words.pub", id="space"),
        pytest.param(f"{'a' * 65}.pub", id="too-long"),
        pytest.param("carol.pub.bak", id="not-pub"),
        pytest.param("carol", id="no-suffix"),
    ],
)
def test_files_without_a_valid_user_name_are_ignored(
    users_dir: Path, new_key: NewKey, file_name: str
) -> None:
    """Only NAME.pub with a valid NAME is a user; other files grant nothing, even with keys."""
    alice, stray = new_key(), new_key()
    write_user(users_dir, "alice", alice.line)
    (users_dir / file_name).write_text(f"{stray.line}\n")
    users = UserKeys(users_dir)

    users.load()

    assert list(users.users) == ["alice"]
    assert users.lookup(stray.key) is None
    assert users.lookup(alice.key) is not None


# --- UserKeys: reloading --------------------------------------------------------------------


def test_reload_if_changed_is_false_when_nothing_changed(users_dir: Path, new_key: NewKey) -> None:
    """With no file added, removed or changed, reload_if_changed() does nothing and says so."""
    write_user(users_dir, "alice", new_key().line)
    users = UserKeys(users_dir)
    users.load()

    assert users.reload_if_changed() is False
    assert users.reload_if_changed() is False


def test_reload_if_changed_picks_up_an_added_file(users_dir: Path, new_key: NewKey) -> None:
    """A new NAME.pub is a new user after the next reload_if_changed()."""
    write_user(users_dir, "alice", new_key().line)
    users = UserKeys(users_dir)
    users.load()
    bob = new_key()

    write_user(users_dir, "bob", bob.line)

    assert users.reload_if_changed() is True
    assert users.lookup(bob.key) == Identity("bob", bob.fingerprint, False)
    assert users.reload_if_changed() is False


def test_reload_if_changed_picks_up_a_removed_file(users_dir: Path, new_key: NewKey) -> None:
    """Removing NAME.pub revokes that user's keys on the next reload_if_changed()."""
    alice, bob = new_key(), new_key()
    write_user(users_dir, "alice", alice.line)
    bob_file = write_user(users_dir, "bob", bob.line)
    users = UserKeys(users_dir)
    users.load()

    bob_file.unlink()

    assert users.reload_if_changed() is True
    assert users.lookup(bob.key) is None
    assert users.lookup(alice.key) is not None
    assert list(users.users) == ["alice"]


def test_reload_if_changed_picks_up_an_edited_file(users_dir: Path, new_key: NewKey) -> None:
    """Replacing a key in NAME.pub swaps which key authenticates that user."""
    old, new = new_key(), new_key()
    path = write_user(users_dir, "alice", old.line)
    users = UserKeys(users_dir)
    users.load()

    write_user(users_dir, "alice", new.line)
    later(path)

    assert users.reload_if_changed() is True
    assert users.lookup(old.key) is None
    assert users.lookup(new.key) == Identity("alice", new.fingerprint, False)


def test_lenient_reload_keeps_previous_keys_of_a_broken_file(
    users_dir: Path, new_key: NewKey
) -> None:
    """A typo in a user's file during a live reload keeps that user's last good keys."""
    alice, bob, bob_new = new_key(), new_key(), new_key()
    alice_file = write_user(users_dir, "alice", alice.line)
    write_user(users_dir, "bob", bob.line)
    users = UserKeys(users_dir)
    users.load()

    alice_file.write_text(f"{alice.line}\nssh-ed25519 oops-half-pasted\n")
    write_user(users_dir, "bob", bob_new.line)
    later(alice_file)

    assert users.reload_if_changed() is True
    assert users.lookup(alice.key) == Identity("alice", alice.fingerprint, False)
    assert users.lookup(bob_new.key) == Identity("bob", bob_new.fingerprint, False)
    assert users.lookup(bob.key) is None


def test_lenient_reload_skips_a_new_broken_file(users_dir: Path, new_key: NewKey) -> None:
    """A broken file for a user never loaded before adds nobody and doesn't stop the reload."""
    alice = new_key()
    write_user(users_dir, "alice", alice.line)
    users = UserKeys(users_dir)
    users.load()

    write_user(users_dir, "bob", "not a key")

    assert users.reload_if_changed() is True
    assert list(users.users) == ["alice"]
    assert users.lookup(alice.key) is not None


# --- host key -------------------------------------------------------------------------------


def test_host_key_is_created_once_as_private_ed25519(tmp_path: Path) -> None:
    """The first call writes a 0600 ed25519 key (and its .pub); later calls return that key."""
    folder = tmp_path / "keys" / "host"

    first = load_or_create_host_key(folder)
    written = (folder / HOST_KEY_NAME).read_bytes()
    second = load_or_create_host_key(folder)

    assert first.get_algorithm() == "ssh-ed25519"
    assert stat.S_IMODE((folder / HOST_KEY_NAME).stat().st_mode) == 0o600
    assert second.public_data == first.public_data
    assert (folder / HOST_KEY_NAME).read_bytes() == written
    public = asyncssh.import_public_key((folder / f"{HOST_KEY_NAME}.pub").read_bytes())
    assert public.public_data == first.public_data


def test_unreadable_host_key_is_a_config_error(tmp_path: Path) -> None:
    """A host key file that isn't a private key is a ConfigError naming it, never overwritten."""
    path = tmp_path / HOST_KEY_NAME
    path.write_text("not a key\n")

    with pytest.raises(ConfigError, match=f"host key {path} cannot be read"):
        load_or_create_host_key(tmp_path)

    assert path.read_text() == "not a key\n"


def test_user_files_differing_only_in_case_stop_start_up(
    users_dir: Path, make_key: Callable[[str], Path]
) -> None:
    """acme.pub and ACME.pub at start-up are one clear error: names ignore case."""
    for name in ("acme", "ACME"):
        (users_dir / f"{name}.pub").write_text(make_key(name).with_suffix(".pub").read_text())
    with pytest.raises(ConfigError, match="name the same user"):
        UserKeys(users_dir).load()


# --- what reloading tells the operator ------------------------------------------------------


def test_admins_are_named_in_any_case(users_dir: Path, new_key: NewKey) -> None:
    """'Alice' in the admins list makes alice.pub's user an admin: names ignore case."""
    alice, bob = new_key(), new_key()
    write_user(users_dir, "alice", alice.line)
    write_user(users_dir, "bob", bob.line)
    users = UserKeys(users_dir, admins=("Alice",))
    users.load()

    assert users.lookup(alice.key) == Identity("alice", alice.fingerprint, True)
    assert users.lookup(bob.key) == Identity("bob", bob.fingerprint, False)


@pytest.mark.usefixtures("fresh_logging")
def test_a_load_logs_what_it_refused_and_what_it_loaded(users_dir: Path, new_key: NewKey) -> None:
    """One line per ignored file and per shared key, then the count of users and keys."""
    shared, alice_own = new_key(), new_key()
    write_user(users_dir, "alice", shared.line, alice_own.line)
    write_user(users_dir, "bob", shared.line)
    stray = write_user(users_dir, "-dash", new_key().line)

    with capture_logs() as logs:
        UserKeys(users_dir).load()

    assert logs == [
        {"event": "user_file_ignored", "path": str(stray), "reason": "invalid user name",
         "log_level": "warning"},
        {"event": "key_refused_shared", "users": ["alice", "bob"],
         "fingerprint": shared.fingerprint, "log_level": "error"},
        {"event": "users_loaded", "users": 2, "keys": 1, "log_level": "info"},
    ]  # fmt: skip


@pytest.mark.usefixtures("fresh_logging")
def test_a_reload_logs_a_broken_file_and_a_clash(users_dir: Path, new_key: NewKey) -> None:
    """A running bus says which file it could not read, and which spelling of a name it refused."""
    acme, aaa = new_key(), new_key()
    write_user(users_dir, "AAA", aaa.line)  # a name with no clash, checked before acme's
    write_user(users_dir, "acme", acme.line)
    users = UserKeys(users_dir)
    users.load()
    broken = write_user(users_dir, "bob", "not a key")
    write_user(users_dir, "ACME", new_key().line)

    with capture_logs() as logs:
        users.reload()

    assert logs == [
        {"event": "user_file_unreadable", "path": str(broken),
         "error": f"{broken}:1: no public key found on this line", "log_level": "error"},
        {"event": "user_name_clash", "files": "ACME.pub, acme.pub", "kept": ["acme"],
         "refused": ["ACME"], "reason": "user names are unique regardless of case",
         "log_level": "error"},
        {"event": "users_loaded", "users": 2, "keys": 2, "log_level": "info"},
    ]  # fmt: skip
    assert users.lookup(acme.key) == Identity("acme", acme.fingerprint, False)


def test_listeners_hear_every_reload_until_removed(users_dir: Path, new_key: NewKey) -> None:
    """add_listener's callback runs after each reload; once removed it does not; removing twice
    is harmless."""
    heard: list[str] = []
    users = UserKeys(users_dir)

    def listener() -> None:
        heard.append("reloaded")

    users.add_listener(listener)
    users.load()
    write_user(users_dir, "alice", new_key().line)
    assert users.reload_if_changed() is True
    assert heard == ["reloaded", "reloaded"]
    users.remove_listener(listener)
    users.remove_listener(listener)
    users.reload()
    assert heard == ["reloaded", "reloaded"]


@pytest.mark.usefixtures("fresh_logging")
def test_a_new_host_key_is_logged(tmp_path: Path) -> None:
    """Generating the host key is logged with its path; loading an existing one is not."""
    with capture_logs() as logs:
        load_or_create_host_key(tmp_path)
        load_or_create_host_key(tmp_path)
    assert logs == [
        {"event": "host_key_generated", "path": str(tmp_path / HOST_KEY_NAME), "log_level": "info"}
    ]


def test_nobody_is_known_before_the_first_load(users_dir: Path, new_key: NewKey) -> None:
    """Until load(), no key belongs to anyone and there are no users."""
    key = new_key()
    write_user(users_dir, "alice", key.line)
    users = UserKeys(users_dir)
    assert users.lookup(key.key) is None
    assert users.users == {}


def test_only_user_files_count_as_a_change(users_dir: Path, new_key: NewKey) -> None:
    """Other files in the users folder (notes, editor backups) do not trigger a reload."""
    write_user(users_dir, "alice", new_key().line)
    users = UserKeys(users_dir)
    users.load()
    (users_dir / "README.txt").write_text("who is who\n")
    assert users.reload_if_changed() is False


def test_host_key_goes_into_an_existing_empty_folder(tmp_path: Path) -> None:
    """A host keys folder that exists already (empty) gets the key; that is not an error."""
    folder = tmp_path / "host"
    folder.mkdir()
    key = load_or_create_host_key(folder)
    assert (folder / HOST_KEY_NAME).exists()
    assert key.get_algorithm() == "ssh-ed25519"


def test_add_creates_the_users_folder_and_its_parents(tmp_path: Path, new_key: NewKey) -> None:
    """add() to a users folder that does not exist yet creates it, parents included."""
    key = new_key()
    users = UserKeys(tmp_path / "keys" / "users")
    assert users.add("alice", key.line, source="alice.pub") == [(key.key.get_fingerprint(), True)]
    assert (tmp_path / "keys" / "users" / "alice.pub").read_text() == f"{key.line}\n"


def test_add_appends_without_a_blank_line(users_dir: Path, new_key: NewKey) -> None:
    """A second key goes on the line after the first: no blank line between them."""
    first, second = new_key(), new_key()
    users = UserKeys(users_dir)
    users.add("alice", first.line, source="-")
    users.add("alice", second.line, source="-")
    assert (users_dir / "alice.pub").read_text() == f"{first.line}\n{second.line}\n"


def test_user_files_differing_only_in_case_are_named_at_start_up(
    users_dir: Path, new_key: NewKey
) -> None:
    """The start-up error names both files and says what to do."""
    write_user(users_dir, "acme", new_key().line)
    write_user(users_dir, "ACME", new_key().line)
    with pytest.raises(ConfigError) as caught:
        UserKeys(users_dir).load()
    assert str(caught.value) == (
        f"user files ACME.pub, acme.pub in {users_dir} name the same user: user names are "
        "unique regardless of case; remove all but one"
    )


def test_remove_one_key_keeps_the_keys_around_it(users_dir: Path, new_key: NewKey) -> None:
    """Removing the middle key of three leaves the first and the last, in order."""
    first, middle, last = new_key(), new_key(), new_key()
    path = write_user(users_dir, "alice", first.line, middle.line, last.line)
    UserKeys(users_dir).remove("alice", middle.key.get_fingerprint())
    assert path.read_text() == f"{first.line}\n{last.line}\n"


def test_remove_from_a_broken_file_names_the_file_and_line(
    users_dir: Path, new_key: NewKey
) -> None:
    """A line that is not a key stops a removal with an error naming where it is."""
    key = new_key()
    path = write_user(users_dir, "alice", key.line, "", "garbage")
    with pytest.raises(ConfigError, match=rf"^{path}:3: no public key found on this line$"):
        UserKeys(users_dir).remove("alice", "SHA256:none")
