"""Options before a key in a user's file, enforced as OpenSSH does: from=, expiry-time=, and
refusal of what drainbus cannot honour (command=, permitopen=, cert-authority, …)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog

from drainbus import identity
from drainbus.identity import UserKeys, read_authorized_keys
from drainbus.key_options import KeyOptionError, parse_key_options
from tests.conftest import RunningBus, User, run_ssh

StartBus = Callable[..., Awaitable[RunningBus]]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl c"


@pytest.mark.parametrize(
    ("patterns", "address", "allowed"),
    [
        pytest.param("10.9.9.9", "10.9.9.9", True, id="exact"),
        pytest.param("10.9.9.9", "127.0.0.1", False, id="other-address"),
        pytest.param("10.0.0.0/8", "10.200.1.2", True, id="cidr"),
        pytest.param("10.0.0.0/8", "11.0.0.1", False, id="outside-cidr"),
        pytest.param("10.9.9.?", "10.9.9.7", True, id="question-mark"),
        pytest.param("10.9.9.?", "10.9.9.77", False, id="question-mark-one-char"),
        pytest.param("*", "192.0.2.1", True, id="star"),
        pytest.param("*,!192.0.2.1", "192.0.2.1", False, id="negation-wins"),
        pytest.param("!192.0.2.1,*", "192.0.2.1", False, id="negation-wins-first"),
        pytest.param("!192.0.2.1", "192.0.2.2", False, id="only-negative-allows-nothing"),
        pytest.param("10.0.0.0/8,!10.9.0.0/16", "10.9.1.1", False, id="negated-cidr"),
        pytest.param("2001:db8::/32", "2001:db8::1", True, id="ipv6-cidr"),
        pytest.param("127.0.0.1", "::ffff:127.0.0.1", True, id="ipv4-mapped"),
        pytest.param("bus.example.com", "127.0.0.1", False, id="names-are-not-looked-up"),
    ],
)
def test_from_matches_as_openssh(patterns: str, address: str, allowed: bool) -> None:
    """from= patterns: wildcards, CIDR, negations that win; the address only (UseDNS no)."""
    options, rest = parse_key_options(f'from="{patterns}" {KEY}')
    assert rest == KEY
    assert (options.refusal(address) is None) is allowed


@pytest.fixture
def kolkata(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC+05:30 while the test runs (so local and UTC times differ)."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("kolkata")
def test_expiry_time_forms() -> None:
    """YYYYMMDD[HHMM[SS]] is local time, a final Z UTC; refused only after that moment."""
    utc = datetime.fromisoformat
    options, _ = parse_key_options(f'expiry-time="20300517123015" {KEY}')
    assert options.expires == utc("2030-05-17T07:00:15+00:00").timestamp()
    options, _ = parse_key_options(f'expiry-time="203005171230Z" {KEY}')
    assert options.expires == utc("2030-05-17T12:30:00+00:00").timestamp()
    options, _ = parse_key_options(f'Expiry-Time="20300517" {KEY}')
    midnight = utc("2030-05-16T18:30:00+00:00").timestamp()
    assert options.expires == midnight
    assert options.refusal("127.0.0.1", now=midnight) is None
    refusal = options.refusal("127.0.0.1", now=midnight + 1)
    assert refusal == "the key expired at 2030-05-16T18:30:00+00:00 (expiry-time)"


@pytest.mark.parametrize(
    "options",
    ["restrict", "no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-user-rc",
     "restrict,pty", 'environment="A=b"', "touch-required"],
)  # fmt: skip
def test_options_that_already_hold_are_accepted(options: str) -> None:
    """restrict and the no-* options hold already: drainbus grants no PTY or forwarding."""
    parsed, rest = parse_key_options(f"{options} {KEY}")
    assert rest == KEY
    assert parsed.refusal("127.0.0.1") is None


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        pytest.param('command="/bin/true"', "option command is not supported", id="command"),
        pytest.param('COMMAND="x"', "option command is not supported", id="name-case"),
        pytest.param('permitopen="host:80"', "option permitopen is not supported", id="permitopen"),
        pytest.param("cert-authority", "option cert-authority is not supported", id="ca"),
        pytest.param('principals="a"', "option principals is not supported", id="principals"),
        pytest.param("verify-required", "option verify-required is not supported", id="verify"),
        pytest.param("no-such-option", "unknown option 'no-such-option'", id="unknown"),
        pytest.param("from=10.9.9.9", 'needs a quoted value: from="..."', id="unquoted"),
        pytest.param('from="10.9.9.9', "has no closing quote", id="no-end-quote"),
        pytest.param('from="10.1.2.3/8"', "is not a network", id="host-bits"),
        pytest.param('from="a",from="b"', "given twice", id="two-froms"),
        pytest.param('expiry-time="2030"', "is not YYYYMMDD", id="short-expiry"),
        pytest.param('expiry-time="20301399"', "not a valid date", id="bad-date"),
        pytest.param('no-pty="x"', "is written no-pty", id="flag-with-value"),
    ],
)
def test_options_drainbus_cannot_honour_refuse_the_line(options: str, reason: str) -> None:
    """An option that would be silently ignored, or cannot be read, refuses the key line."""
    with pytest.raises(KeyOptionError, match=reason):
        parse_key_options(f"{options} {KEY}")


def test_a_refused_line_is_logged_and_the_files_other_keys_still_work(
    users_dir: Path, add_user: Callable[[str], User], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cert-authority (a CA key is no login key) is refused at load with a reason; the rest
    of the file still counts."""
    alice = add_user("alice")
    ca = add_user("ca-holder")
    path = users_dir / "alice.pub"
    path.write_text(f"cert-authority {ca.public_key}{alice.public_key}")
    (users_dir / "ca-holder.pub").unlink()
    users = UserKeys(users_dir)

    # A fresh logger: one cached after an earlier test configured logging would bypass capture.
    monkeypatch.setattr(identity, "log", structlog.get_logger(identity.__name__))
    with structlog.testing.capture_logs() as events:
        users.load()

    [refused] = [e for e in events if e["event"] == "key_refused"]
    assert (refused["path"], refused["line"], refused["user"]) == (str(path), 1, "alice")
    assert "cert-authority" in refused["reason"]
    [ca_key, alice_key] = [e.key for e in read_authorized_keys(path.read_text(), source="f")]
    assert users.lookup(ca_key) is None
    assert users.lookup(alice_key) is not None


async def _login(node: RunningBus, user: User) -> tuple[int, str]:
    result = await run_ssh(node.port, user.key_file, "whoami")
    return result.code, result.stdout.decode() + result.stderr


def _restrict(users_dir: Path, user: User, options: str) -> None:
    (users_dir / f"{user.name}.pub").write_text(f"{options} {user.public_key}")


@pytest.mark.parametrize(
    ("options", "allowed"),
    [
        pytest.param('from="10.9.9.9"', False, id="from-elsewhere"),
        pytest.param('from="127.0.0.0/8,!10.*"', True, id="from-here-cidr"),
        pytest.param('from="127.0.0.?"', True, id="from-here-wildcard"),
        pytest.param('from="*,!127.0.0.1"', False, id="from-negated"),
        pytest.param('expiry-time="20200101"', False, id="expired"),
        pytest.param('expiry-time="20991231Z"', True, id="not-expired"),
        pytest.param("restrict,no-pty,no-port-forwarding", True, id="restrict"),
        pytest.param('command="/bin/true"', False, id="command"),
        pytest.param('permitopen="localhost:22"', False, id="permitopen"),
        pytest.param("cert-authority", False, id="cert-authority"),
    ],
)
async def test_key_options_decide_logins_through_openssh(
    start_bus: StartBus,
    add_user: Callable[[str], User],
    users_dir: Path,
    options: str,
    allowed: bool,
) -> None:
    """The real ssh client logs in only as its key line's options allow."""
    alice = add_user("alice")
    _restrict(users_dir, alice, options)
    node = await start_bus()

    code, output = await _login(node, alice)

    if allowed:
        assert (code, "user: alice" in output) == (0, True)
    else:
        assert code == 255
        assert "Permission denied (publickey)" in output


async def test_an_expiry_time_is_enforced_at_login_after_a_reload(
    start_bus: StartBus, add_user: Callable[[str], User], users_dir: Path
) -> None:
    """An expiry-time a minute ago, written while the bus runs, refuses the next login."""
    alice = add_user("alice")
    node = await start_bus()
    assert (await _login(node, alice))[0] == 0
    past = (datetime.now() - timedelta(minutes=1)).strftime("%Y%m%d%H%M%S")
    _restrict(users_dir, alice, f'expiry-time="{past}"')
    node.users.reload()  # what the folder watch does on the next change
    assert (await _login(node, alice))[0] == 255
