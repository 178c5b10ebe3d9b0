"""`drainbus keys add | ls | rm`: managing the users folder from the command line."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import asyncssh
import pytest
from click.testing import CliRunner, Result

from drainbus.cli import cli
from drainbus.errors import ExitCode


class PublicKey(NamedTuple):
    """A generated key: its .pub file, its authorized_keys line and its SHA256 fingerprint."""

    path: Path
    line: str
    fingerprint: str


NewKey = Callable[..., PublicKey]
Run = Callable[..., Result]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DRAINBUS_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("DRAINBUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def new_key(make_key: Callable[[str], Path]) -> NewKey:
    """A fresh ed25519 key from the real ssh-keygen (conftest's make_key), comment = label."""
    numbers = itertools.count()

    def make(label: str | None = None) -> PublicKey:
        private = make_key(label or f"key{next(numbers)}")
        path = Path(f"{private}.pub")
        line = path.read_text().strip()
        return PublicKey(path, line, asyncssh.import_public_key(line).get_fingerprint())

    return make


@pytest.fixture
def run(tmp_path: Path, users_dir: Path) -> Run:
    """Invoke `drainbus --config FILE ARGS…`; the file sets users_dir and admins = ["alice"]."""
    config = tmp_path / "drainbus.toml"
    config.write_text(f'[server]\nusers_dir = "{users_dir}"\nadmins = ["alice"]\n')

    def invoke(*args: str, stdin: str | None = None) -> Result:
        return CliRunner().invoke(cli, ["--config", str(config), *args], obj={}, input=stdin)

    return invoke


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


# --- add ------------------------------------------------------------------------------------


def test_add_creates_user_file_and_prints_fingerprint(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """`keys add NAME FILE` writes the key to NAME.pub and prints its fingerprint."""
    key = new_key()

    result = run("keys", "add", "alice", str(key.path))

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"alice: added {key.fingerprint}\n"
    assert lines_of(users_dir / "alice.pub") == [key.line]


def test_add_reads_stdin(run: Run, users_dir: Path, new_key: NewKey) -> None:
    """'-' reads the keys from stdin, skipping comments and blank lines."""
    laptop, ci = new_key("laptop"), new_key("ci")

    result = run("keys", "add", "bob", "-", stdin=f"# bob\n\n{laptop.line}\n{ci.line}\n")

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"bob: added {laptop.fingerprint}",
        f"bob: added {ci.fingerprint}",
    ]
    assert lines_of(users_dir / "bob.pub") == [laptop.line, ci.line]


def test_add_same_key_again_is_reported_not_duplicated(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """Adding a key the user already has succeeds, says so, and leaves the file as it was."""
    key = new_key()
    run("keys", "add", "alice", str(key.path))

    result = run("keys", "add", "alice", str(key.path))

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"alice: {key.fingerprint} already present\n"
    assert lines_of(users_dir / "alice.pub") == [key.line]


def test_add_same_key_twice_in_one_input_writes_it_once(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """A key repeated in the input is written once."""
    key = new_key()

    result = run("keys", "add", "alice", "-", stdin=f"{key.line}\n{key.line}\n")

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"alice: added {key.fingerprint}",
        f"alice: {key.fingerprint} already present",
    ]
    assert lines_of(users_dir / "alice.pub") == [key.line]


def test_add_appends_after_a_file_without_final_newline(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """A hand-edited file lacking its last newline keeps both keys usable on separate lines."""
    old, new = new_key("old"), new_key("new")
    (users_dir / "alice.pub").write_text(old.line)

    result = run("keys", "add", "alice", str(new.path))

    assert result.exit_code == 0, result.stderr
    assert lines_of(users_dir / "alice.pub") == [old.line, new.line]
    listed = run("keys", "ls").stdout
    assert old.fingerprint in listed
    assert new.fingerprint in listed


def test_add_key_of_another_user_fails_naming_the_owner(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """A key that already belongs to someone else is refused, naming the owner; nothing is added."""
    fresh, alices = new_key(), new_key()
    run("keys", "add", "alice", str(alices.path))

    result = run("keys", "add", "bob", "-", stdin=f"{fresh.line}\n{alices.line}\n")

    assert result.exit_code == ExitCode.CONFIG
    assert f"drainbus: key {alices.fingerprint} already belongs to user 'alice'" in result.stderr
    assert result.stdout == ""
    assert not (users_dir / "bob.pub").exists()
    assert lines_of(users_dir / "alice.pub") == [alices.line]


def test_add_name_differing_only_in_case_is_refused(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """`keys add ACME` next to `acme` is refused (exit 64): names are unique regardless of case."""
    acmes, other = new_key(), new_key()
    run("keys", "add", "acme", str(acmes.path))

    result = run("keys", "add", "ACME", str(other.path))

    assert result.exit_code == ExitCode.USAGE
    assert "user 'acme' already exists: user names are unique regardless of case" in result.stderr
    assert sorted(p.name for p in users_dir.iterdir()) == ["acme.pub"]


@pytest.fixture
def run_shared(tmp_path: Path, users_dir: Path) -> Run:
    """`drainbus keys …` on a shared bus: [[acl]] rules for shared/**, team-*/deploys and **,
    the drain topic cache-drain (the default), owner separator '-' (the default)."""
    config = tmp_path / "shared.toml"
    config.write_text(
        f'[server]\nusers_dir = "{users_dir}"\n'
        '[[acl]]\ntopics = ["shared/**", "team-*/deploys"]\npublish = ["*"]\n'
        '[[acl]]\ntopics = ["**"]\nsubscribe = ["@admins"]\n'
    )

    def invoke(*args: str, stdin: str | None = None) -> Result:
        return CliRunner().invoke(cli, ["--config", str(config), *args], obj={}, input=stdin)

    return invoke


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("cache-drain", "it would own topic 'cache-drain'", id="drain-topic"),
        pytest.param("Cache-Drain", "it would own topic 'cache-drain'", id="drain-topic-case"),
        pytest.param("shared", "it would own topic 'shared/**'", id="acl-topic"),
        pytest.param("team-red", "it would own topic 'team-*/deploys'", id="acl-glob"),
        pytest.param("mallory-corp", "it falls inside user 'mallory''s scope", id="inside-other"),
        pytest.param("MALLORY-x", "it falls inside user 'mallory''s scope", id="inside-case"),
        pytest.param("acme", "its scope would cover user 'acme-blog'", id="covers-other"),
        pytest.param("carol", None, id="unrelated"),
        pytest.param("malloryx", None, id="no-separator"),
        pytest.param("team", None, id="glob-needs-more"),
        pytest.param("acme.blog", None, id="other-punctuation"),
    ],
)
def test_add_refuses_names_that_would_own_what_is_not_theirs(
    run_shared: Run, users_dir: Path, new_key: NewKey, name: str, reason: str | None
) -> None:
    """A name equal to or covering a topic an [[acl]] rule or the drain governs, inside another
    user's purge scope, or whose own scope covers another user, exits 64 with one line."""
    for existing in ("mallory", "acme-blog"):
        assert run_shared("keys", "add", existing, str(new_key().path)).exit_code == 0
    key = new_key()

    result = run_shared("keys", "add", name, str(key.path))

    if reason is None:
        assert (result.exit_code, result.stderr) == (0, "")
        assert (users_dir / f"{name}.pub").exists()
    else:
        assert result.exit_code == ExitCode.USAGE
        assert result.stderr.startswith(f"drainbus: user name '{name}' is refused: {reason}")
        assert result.stderr.count("\n") == 1
        assert sorted(p.stem for p in users_dir.iterdir()) == ["acme-blog", "mallory"]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("bad name", id="space"),
        pytest.param("-alice", id="leading-dash"),
        pytest.param("../escape", id="path"),
        pytest.param("a" * 65, id="too-long"),
        pytest.param("alice\n", id="trailing-newline"),
    ],
)
def test_add_invalid_name_fails_with_usage_exit(
    run: Run, tmp_path: Path, users_dir: Path, new_key: NewKey, name: str
) -> None:
    """An invalid user name exits 64 naming it, and writes no file anywhere."""
    key = new_key()
    before = sorted(tmp_path.rglob("*"))

    result = run("keys", "add", "--", name, str(key.path))

    assert result.exit_code == int(ExitCode.USAGE) == 64
    assert f"drainbus: user name '{name}' is invalid" in result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_add_invalid_key_file_fails_naming_file_and_line(
    run: Run, users_dir: Path, tmp_path: Path, new_key: NewKey
) -> None:
    """A key file with a bad line exits 78 naming file:line, and adds nothing."""
    bad = tmp_path / "bad.pub"
    bad.write_text(f"{new_key().line}\nssh-ed25519 AAAA-truncated\n")

    result = run("keys", "add", "alice", str(bad))

    assert result.exit_code == ExitCode.CONFIG
    assert f"drainbus: {bad}:2: not a valid public key" in result.stderr
    assert not (users_dir / "alice.pub").exists()


@pytest.mark.parametrize(
    ("options", "accepted"),
    [
        pytest.param('command="/bin/true"', False, id="command"),
        pytest.param("cert-authority", False, id="cert-authority"),
        pytest.param('from="10.0.0.0/8",restrict', True, id="from-restrict"),
    ],
)
def test_add_refuses_options_drainbus_cannot_honour(
    run: Run, users_dir: Path, new_key: NewKey, options: str, accepted: bool
) -> None:
    """keys add keeps a key line's options; one it would have to ignore exits 78 with why."""
    key = new_key()

    result = run("keys", "add", "alice", "-", stdin=f"{options} {key.line}\n")

    if accepted:
        assert result.exit_code == 0
        assert lines_of(users_dir / "alice.pub") == [f"{options} {key.line}"]
    else:
        assert result.exit_code == ExitCode.CONFIG
        assert f"key {key.fingerprint} refused: option {options.partition('=')[0]}" in result.stderr
        assert not (users_dir / "alice.pub").exists()


def test_add_refuses_a_weak_rsa_key(run: Run, users_dir: Path, tmp_path: Path) -> None:
    """An RSA key under 2048 bits exits 78 saying so, and adds nothing."""
    weak = tmp_path / "rsa1024"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(weak)], check=True
    )

    result = run("keys", "add", "alice", f"{weak}.pub")

    assert result.exit_code == ExitCode.CONFIG
    assert "refused: RSA keys need at least 2048 bits; this one has 1024" in result.stderr
    assert not (users_dir / "alice.pub").exists()


def test_add_without_any_key_fails(run: Run, users_dir: Path) -> None:
    """Input holding only comments is refused rather than creating an empty user."""
    result = run("keys", "add", "alice", "-", stdin="# nothing here\n")

    assert result.exit_code == ExitCode.CONFIG
    assert "holds no public key" in result.stderr
    assert not (users_dir / "alice.pub").exists()


def test_users_dir_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, new_key: NewKey
) -> None:
    """DRAINBUS_SERVER__USERS_DIR alone, with no config file, says where users live."""
    folder = tmp_path / "from-env"
    monkeypatch.setenv("DRAINBUS_SERVER__USERS_DIR", str(folder))
    key = new_key()

    result = CliRunner().invoke(cli, ["keys", "add", "carol", str(key.path)], obj={})

    assert result.exit_code == 0, result.stderr
    assert lines_of(folder / "carol.pub") == [key.line]


# --- ls -------------------------------------------------------------------------------------


def test_ls_lists_users_fingerprints_and_admins(run: Run, new_key: NewKey) -> None:
    """`keys ls` prints one line per key: user (marked if admin), fingerprint, type, comment."""
    bob_key, alice_laptop, alice_ci = new_key("bob@desk"), new_key("laptop"), new_key("ci")
    run("keys", "add", "bob", str(bob_key.path))
    run("keys", "add", "alice", "-", stdin=f"{alice_laptop.line}\n{alice_ci.line}\n")

    result = run("keys", "ls")

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"alice (admin)\t{alice_laptop.fingerprint}\tssh-ed25519\tlaptop",
        f"alice (admin)\t{alice_ci.fingerprint}\tssh-ed25519\tci",
        f"bob\t{bob_key.fingerprint}\tssh-ed25519\tbob@desk",
    ]


def test_ls_with_no_users_prints_nothing(run: Run) -> None:
    """With an empty users folder, `keys ls` succeeds and prints nothing."""
    result = run("keys", "ls")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""


# --- rm -------------------------------------------------------------------------------------


def test_rm_with_fingerprint_removes_only_that_key(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """`keys rm NAME FP` drops that key and keeps the user's other keys and comments."""
    keep, drop = new_key("keep"), new_key("drop")
    (users_dir / "alice.pub").write_text(f"# alice\n{keep.line}\n{drop.line}\n")

    result = run("keys", "rm", "alice", drop.fingerprint)

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"alice: removed {drop.fingerprint}\n"
    assert lines_of(users_dir / "alice.pub") == ["# alice", keep.line]


def test_rm_without_fingerprint_removes_the_user(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """`keys rm NAME` deletes NAME.pub; other users stay."""
    run("keys", "add", "alice", str(new_key().path))
    run("keys", "add", "bob", str(new_key().path))

    result = run("keys", "rm", "alice")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "alice: removed\n"
    assert sorted(p.name for p in users_dir.iterdir()) == ["bob.pub"]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("nobody", id="unknown"),
        pytest.param("../users/bob", id="path"),
    ],
)
def test_rm_unknown_user_fails(run: Run, users_dir: Path, new_key: NewKey, name: str) -> None:
    """Removing a user that has no file exits 64 naming them, and touches no other file."""
    run("keys", "add", "bob", str(new_key().path))

    result = run("keys", "rm", name)

    assert result.exit_code == ExitCode.USAGE
    assert f"drainbus: no user '{name}' in {users_dir}" in result.stderr
    assert (users_dir / "bob.pub").exists()


def test_rm_unknown_fingerprint_fails_and_keeps_the_file(
    run: Run, users_dir: Path, new_key: NewKey
) -> None:
    """Removing a fingerprint the user doesn't have exits 64 and leaves their file alone."""
    alices, other = new_key(), new_key()
    run("keys", "add", "alice", str(alices.path))

    result = run("keys", "rm", "alice", other.fingerprint)

    assert result.exit_code == ExitCode.USAGE
    assert f"drainbus: user 'alice' has no key {other.fingerprint}" in result.stderr
    assert lines_of(users_dir / "alice.pub") == [alices.line]


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--bogus"],
        ["keys", "add"],
        ["dlq", "bogus"],
        ["pub", "--bogus", "cache-drain"],
        ["no-such-command"],
        ["check-config", "--bogus"],
        ["serve", "--workers", "-1"],
    ],
    ids=["serve-option", "keys-add-args", "dlq-subcommand", "pub-option", "command",
         "check-config-option", "bad-value"],
)  # fmt: skip
def test_every_usage_error_exits_64(argv: list[str]) -> None:
    """One policy for the whole command line: a usage error is EX_USAGE (64), never click's 2."""
    result = CliRunner().invoke(cli, argv, obj={})
    assert result.exit_code == 64, result.output
    assert "Usage:" in result.output
