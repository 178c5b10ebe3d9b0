"""``drainbus tokens add|ls|rm``: a token is printed once, and only its hash is kept."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from drainbus.http.tokens import TokenStore


def drainbus(users_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DRAINBUS_SERVER__USERS_DIR": str(users_dir),
           "DRAINBUS_SERVER__ADMINS": '["root"]'}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "drainbus", *args],
        capture_output=True, text=True, env=env, timeout=20, check=False,
    )  # fmt: skip


def test_add_prints_the_token_once_and_stores_its_hash(users_dir: Path) -> None:
    """stdout is the token alone; the file holds its SHA-256, mode 0600, never the token."""
    result = drainbus(users_dir, "tokens", "add", "acme")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("dbt_")
    assert len(token) > 40
    stored = (users_dir / "acme.tokens").read_text()
    assert token not in stored
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert (users_dir / "acme.tokens").stat().st_mode & 0o777 == 0o600
    assert TokenStore(users_dir, ["root"]).lookup(token) is None  # not loaded yet: no magic
    store = TokenStore(users_dir, ["root"])
    store.reload()
    identity = store.lookup(token)
    assert identity is not None
    assert (identity.user, identity.is_admin) == ("acme", False)
    assert store.lookup(token + "x") is None


def test_ls_shows_ids_and_rm_removes_one_or_all(users_dir: Path) -> None:
    """ls names tokens by id; rm NAME ID removes that one, rm NAME the rest."""
    first = drainbus(users_dir, "tokens", "add", "acme").stdout.strip()
    second = drainbus(users_dir, "tokens", "add", "acme").stdout.strip()
    admin = drainbus(users_dir, "tokens", "add", "root").stdout.strip()
    listing = drainbus(users_dir, "tokens", "ls")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["acme", "acme", "root (admin)"]
    assert not any(t in listing.stdout for t in (first, second, admin))
    first_id = "sha256:" + hashlib.sha256(first.encode()).hexdigest()[:12]
    assert first_id in listing.stdout
    removed = drainbus(users_dir, "tokens", "rm", "acme", first_id)
    assert (removed.returncode, removed.stdout.strip()) == (
        0,
        f"acme: removed 1 token(s) ({first_id})",
    )
    store = TokenStore(users_dir)
    store.reload()
    assert (store.lookup(first), store.lookup(second) is not None) == (None, True)
    assert drainbus(users_dir, "tokens", "rm", "acme").stdout.strip() == "acme: removed 1 token(s)"
    store.reload()
    assert store.lookup(second) is None


def test_refusals_are_one_line_with_exit_64(users_dir: Path) -> None:
    """A name inside another user's scope, another spelling of a user, an unknown id: 64."""
    (users_dir / "acme.pub").write_text("")
    cases = [
        (("tokens", "add", "acme-corp"), "inside user 'acme'"),
        (("tokens", "add", "ACME"), "unique regardless of case"),
        (("tokens", "add", "cache-drain"), "would own topic"),
        (("tokens", "add", "bad name"), "is invalid"),
        (("tokens", "rm", "acme", "sha256:000000000000"), "has no token"),
    ]
    for args, message in cases:
        result = drainbus(users_dir, *args)
        assert result.returncode == 64, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert message in result.stderr
    assert not list(users_dir.glob("*.tokens"))
