"""The systemd units in systemd/ load cleanly, stay sandboxed, and match drainbus itself.

systemd-analyze, systemd-sysusers and systemd-tmpfiles work on files alone, so these tests
need the systemd package but no running systemd (they pass in a container). Missing tools
fail the test with the command that installs them: an unchecked unit is not a passing one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from drainbus.cli import cli
from drainbus.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNITS = ["drainbus.service", "drainbus-drain.service"]
SYSUSERS = SYSTEMD / "drainbus.sysusers.conf"
TMPFILES = SYSTEMD / "drainbus.tmpfiles.conf"
MAX_EXPOSURE = 2.0

# The stub root has the units and their executables but no sysinit.target or any other unit
# they implicitly depend on; errors in those are not ours to report.
VERIFY_FLAGS = ["--recursive-errors=no", "--man=no", "--generators=no"]


def tool(name: str) -> str:
    """The path of a systemd command-line tool; fails the test with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install the systemd package "
            "(apt-get install systemd, or scripts/check as root installs it)"
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


@dataclass(frozen=True)
class Unit:
    """A unit file's settings: every ``Key=value`` line of each section, in order."""

    name: str
    text: str
    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def load(cls, name: str) -> Unit:
        text = (SYSTEMD / name).read_text()
        sections: dict[str, list[tuple[str, str]]] = {}
        current: list[tuple[str, str]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), [])
                continue
            key, _, value = line.partition("=")
            current.append((key, value))
        return cls(name, text, sections)

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [value for k, value in self.sections.get(section, []) if k == key]

    def value(self, key: str, section: str = "Service") -> str:
        (value,) = self.values(key, section)
        return value

    def executables(self) -> set[str]:
        """The programs the Exec*= lines run (their special prefixes @-:+! dropped)."""
        return {
            value.split()[0].lstrip("@-:+!|")
            for key, value in self.sections["Service"]
            if key.startswith("Exec") and value
        }

    def exec_start_args(self) -> list[str]:
        return self.value("ExecStart").split()

    def environment(self) -> dict[str, str]:
        return dict(value.split("=", 1) for value in self.values("Environment"))


def stub_root(tmp_path: Path, unit: Unit, *, with_executables: bool = True) -> Path:
    """An alternate root holding the unit and a stub script at each path it executes."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(SYSTEMD / unit.name, root / "etc/systemd/system" / unit.name)
    if with_executables:
        for program in unit.executables():
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    return root


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to report, executables included.

    verify insists that ExecStart's program exists, and /opt/drainbus/venv/bin/drainbus is
    created only by the documented install. So verify runs with --root on a temp tree that
    holds the unit and a stub at every path its Exec*= lines name: everything in the unit is
    checked, and only the programs' existence is taken on trust.
    """
    analyze = tool("systemd-analyze")
    root = stub_root(tmp_path, Unit.load(name))
    result = run(analyze, "verify", f"--root={root}", *VERIFY_FLAGS, name)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_in_the_stub_root_still_checks_executables(tmp_path: Path) -> None:
    """Without the stubs, the same verify run fails on ExecStart: the root hides nothing."""
    analyze = tool("systemd-analyze")
    root = stub_root(tmp_path, Unit.load("drainbus.service"), with_executables=False)
    result = run(analyze, "verify", f"--root={root}", *VERIFY_FLAGS, "drainbus.service")
    assert result.returncode != 0
    assert "/opt/drainbus/venv/bin/drainbus is not executable" in result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_unit_exposure_is_at_most_2(name: str) -> None:
    """`systemd-analyze security --offline=yes` rates the unit's exposure 2.0 or lower."""
    analyze = tool("systemd-analyze")
    result = run(analyze, "security", "--offline=yes", "--no-pager", str(SYSTEMD / name))
    match = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert float(match.group(1)) <= MAX_EXPOSURE, "\n".join([match.group(0), *exposed])


@pytest.mark.parametrize("name", UNITS)
def test_exec_start_is_a_command_drainbus_accepts(name: str) -> None:
    """ExecStart runs the documented venv's drainbus with options its CLI parses."""
    program, command, *args = Unit.load(name).exec_start_args()
    assert program == "/opt/drainbus/venv/bin/drainbus"
    assert command == {"drainbus.service": "serve", "drainbus-drain.service": "drain"}[name]
    subcommand = cli.get_command(click.Context(cli), command)
    assert subcommand is not None
    ctx = subcommand.make_context(command, args)
    assert ctx.params["config"] == "/etc/drainbus/drainbus.toml"


def test_bus_unit_writes_only_inside_its_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The data dir and host keys drainbus writes lie in StateDirectory, writable under strict."""
    unit = Unit.load("drainbus.service")
    assert unit.value("ProtectSystem") == "strict"
    state = Path("/var/lib") / unit.value("StateDirectory")
    assert Path(unit.value("WorkingDirectory")) == state
    for key, value in unit.environment().items():
        monkeypatch.setenv(key, value)
    args = unit.exec_start_args()
    data_dir = Path(args[args.index("--data-dir") + 1])
    settings = load_settings(None, {"data_dir": data_dir})
    assert settings.server.host_keys_dir == state / "keys/host"
    config_dir = Path("/etc") / unit.value("ConfigurationDirectory")
    assert settings.server.users_dir == config_dir / "users"
    assert settings.data_dir.is_relative_to(state)


def test_drain_unit_writes_only_to_the_nginx_cache() -> None:
    """The drain-only unit runs as nginx's user, with nginx's cache its only writable path."""
    unit = Unit.load("drainbus-drain.service")
    assert unit.value("ProtectSystem") == "strict"
    assert unit.values("ReadWritePaths") == ["-/var/cache/nginx"]
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory"):
        assert unit.values(key) == [], key
    assert unit.value("User") == "www-data"
    assert unit.value("SupplementaryGroups") == "drainbus"  # reads drainbus.toml


@pytest.mark.parametrize("name", UNITS)
def test_cloudflare_credential_path_in_the_comment_is_this_units(name: str) -> None:
    """The api_token_file a unit's comment gives is its credential; tmpfiles creates the source."""
    unit = Unit.load(name)
    credential, source = unit.value("LoadCredential").split(":")
    assert f'api_token_file = "/run/credentials/{name}/{credential}"' in unit.text
    tmpfiles_lines = [line.split() for line in TMPFILES.read_text().splitlines()]
    assert ["f", source, "0600", "root", "root", "-"] in tmpfiles_lines


def entries(path: Path) -> dict[str, list[str]]:
    """The entries of an /etc/passwd or /etc/group file, by name: its colon-separated fields."""
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


@pytest.fixture
def sysusers_root(tmp_path: Path) -> Path:
    """An alternate root whose /etc/passwd and /etc/group systemd-sysusers filled in."""
    sysusers = tool("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = run(sysusers, f"--root={root}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    return root


def test_sysusers_creates_the_drainbus_system_user(sysusers_root: Path) -> None:
    """systemd-sysusers creates user and group drainbus, homed in the state dir, no login."""
    _, _, uid, gid, _, home, shell = entries(sysusers_root / "etc/passwd")["drainbus"]
    assert entries(sysusers_root / "etc/group")["drainbus"][2] == gid
    assert int(uid) < 1000
    assert home == "/var/lib/drainbus"
    assert shell.endswith("nologin")


def test_tmpfiles_snippet_parses(sysusers_root: Path) -> None:
    """systemd-tmpfiles reads every line, resolving its users and groups, without complaint."""
    tmpfiles = tool("systemd-tmpfiles")
    # --clean parses the whole file but changes nothing here (no line has an age).
    result = run(tmpfiles, f"--root={sysusers_root}", "--clean", str(TMPFILES))
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles --create chowns: needs root")
def test_tmpfiles_keeps_secrets_private_and_an_existing_token(sysusers_root: Path) -> None:
    """tmpfiles makes config and token private and creates an empty token, never emptying one."""
    tmpfiles = tool("systemd-tmpfiles")
    etc = sysusers_root / "etc/drainbus"
    etc.mkdir()
    (etc / "drainbus.toml").write_text("redis_url = 'redis://:secret@redis:6379/0'\n")
    (etc / "drainbus.toml").chmod(0o644)
    drainbus_gid = int(entries(sysusers_root / "etc/group")["drainbus"][2])

    created = run(tmpfiles, f"--root={sysusers_root}", "--create", str(TMPFILES))
    assert (created.returncode, created.stderr) == (0, "")
    config, token = (etc / "drainbus.toml").stat(), (etc / "cloudflare-token").stat()
    assert (config.st_mode & 0o777, config.st_uid, config.st_gid) == (0o640, 0, drainbus_gid)
    assert (token.st_mode & 0o777, token.st_uid, token.st_size) == (0o600, 0, 0)
    assert (etc / "users").is_dir()

    (etc / "cloudflare-token").write_text("cf-token\n")
    again = run(tmpfiles, f"--root={sysusers_root}", "--create", str(TMPFILES))
    assert again.returncode == 0, again.stderr
    assert (etc / "cloudflare-token").read_text() == "cf-token\n"
