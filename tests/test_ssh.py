"""The SSH front door and its commands, driven by the real OpenSSH client."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest

from drainbus.terminal import escape_controls
from tests.conftest import (
    RunningBus,
    Subscriber,
    User,
    run_ssh,
    ssh_argv,
    wait_subscribed,
)

StartBus = Callable[..., Awaitable[RunningBus]]
Subscribe = Callable[..., Awaitable[Subscriber]]


async def test_published_line_reaches_live_subscriber(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """echo mysite | ssh bus pub cache-drain is seen by ssh bus sub cache-drain."""
    alice = add_user("alice")
    mysite = add_user("mysite")
    node = await start_bus()
    sub = await subscribe(node.port, alice.key_file, "cache-drain")
    await wait_subscribed(node.bus, "cache-drain")
    result = await run_ssh(node.port, mysite.key_file, "pub", "cache-drain", stdin=b"mysite\n")
    assert (result.code, result.stdout, result.stderr) == (0, b"", "")
    assert await sub.line() == b"mysite"


async def test_login_name_is_ignored_identity_is_the_key(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """Whatever login name the client sends, the user is the owner of the key."""
    add_user("root")
    bob = add_user("bob")
    node = await start_bus()
    result = await run_ssh(node.port, bob.key_file, "whoami", login="root")
    assert result.code == 0
    text = result.stdout.decode()
    assert "user: bob" in text
    assert "admin: no" in text
    assert "key: SHA256:" in text


async def test_whoami_reports_admin(start_bus: StartBus, add_user: Callable[[str], User]) -> None:
    """An admin (server.admins) sees admin: yes; --json gives the same as an object."""
    root = add_user("root")
    node = await start_bus()
    result = await run_ssh(node.port, root.key_file, "whoami", "--json")
    assert json.loads(result.stdout)["is_admin"] is True


async def test_unknown_key_is_refused_like_openssh(
    start_bus: StartBus, add_user: Callable[[str], User], make_key: Callable[[str], Path]
) -> None:
    """A key in no user's file gets 'Permission denied (publickey)' and exit 255."""
    add_user("alice")
    stranger = make_key("stranger")
    node = await start_bus()
    result = await run_ssh(node.port, stranger, "whoami")
    assert result.code == 255
    assert "Permission denied (publickey)" in result.stderr


async def test_bare_ssh_prints_help_and_exits_zero(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """`ssh bus` with no command prints the command list and exits 0."""
    alice = add_user("alice")
    node = await start_bus()
    result = await run_ssh(node.port, alice.key_file)
    assert result.code == 0
    for name in ("pub", "sub", "ls", "whoami", "stats", "help"):
        assert f"  {name} " in result.stdout.decode()


async def test_help_lists_every_command_with_an_example(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """`help` names each command with a one-line description and an example."""
    alice = add_user("alice")
    node = await start_bus()
    text = (await run_ssh(node.port, alice.key_file, "help")).stdout.decode()
    assert text.count("e.g. ") == 6
    assert text.count("ssh bus ") >= 5


@pytest.mark.parametrize("command", ["pub", "sub", "ls", "whoami", "stats", "help"])
async def test_each_command_prints_usage_on_help(
    start_bus: StartBus, add_user: Callable[[str], User], command: str
) -> None:
    """`COMMAND --help` prints its usage on stdout and exits 0."""
    alice = add_user("alice")
    node = await start_bus()
    result = await run_ssh(node.port, alice.key_file, command, "--help")
    assert result.code == 0
    assert result.stdout.decode().startswith(f"usage: ssh bus {command}")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["frobnicate"], "unknown command 'frobnicate'", id="unknown-command"),
        pytest.param(["pub"], "the following arguments are required: topic", id="missing-topic"),
        pytest.param(["sub", "x", "--bogus"], "unrecognized arguments: --bogus", id="bad-option"),
        pytest.param(["pub", "a..b"], "topic 'a..b' is invalid", id="dot-dot"),
        pytest.param(["sub", "/abs"], "topic '/abs' is invalid", id="leading-slash"),
        pytest.param(["pub", "x" * 129], "is invalid: use 1-128", id="too-long"),
        pytest.param(["sub", "cache-drain", "--since", "yesterday"], "--since 'yesterday'",
                     id="bad-since"),
        pytest.param(["sub", "cache-drain", "--count", "0"], "--count must be", id="zero-count"),
    ],
)  # fmt: skip
async def test_usage_errors_exit_64_with_one_line(
    start_bus: StartBus, add_user: Callable[[str], User], args: list[str], fragment: str
) -> None:
    """A usage error is one stderr line pointing at help, and exit code 64."""
    alice = add_user("alice")
    node = await start_bus()
    result = await run_ssh(node.port, alice.key_file, *args)
    assert result.code == 64
    assert fragment in result.stderr
    assert "run 'ssh bus help'" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["pub", "sub"])
async def test_topic_outside_the_users_rights_exits_77(
    start_bus: StartBus, add_user: Callable[[str], User], command: str
) -> None:
    """Publishing or subscribing to another user's topic is refused with exit 77."""
    add_user("bob")
    alice = add_user("alice")
    node = await start_bus()
    result = await run_ssh(node.port, alice.key_file, command, "bob/deploys", stdin=b"x\n")
    assert result.code == 77
    assert "user 'alice' may not" in result.stderr


async def test_own_namespace_and_acl_topics_are_allowed(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """A user may publish under NAME/… and on topics an [[acl]] rule grants."""
    alice = add_user("alice")
    node = await start_bus()
    for topic in ("alice", "alice/deploys", "cache-drain", "shared/x/y"):
        result = await run_ssh(node.port, alice.key_file, "pub", topic, stdin=b"alice-blog\n")
        assert (topic, result.code, result.stderr) == (topic, 0, "")


async def test_oversize_line_is_rejected_and_the_rest_published(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """A line over max_message_bytes is named by number, exit 65, valid lines are stored."""
    alice = add_user("alice")
    node = await start_bus(server={"max_message_bytes": 100})
    stdin = b"first\n" + b"x" * 101 + b"\n\nthird\r\n" + b"y" * 5000 + b"\nlast-no-newline"
    result = await run_ssh(node.port, alice.key_file, "pub", "alice/t", stdin=stdin)
    assert result.code == 65
    assert "line 2: line is longer than 100 bytes" in result.stderr
    assert "line 5: line is longer than 100 bytes" in result.stderr
    replay = await run_ssh(
        node.port, alice.key_file, "sub", "alice/t", "--since", "all", "--count", "3"
    )
    assert replay.stdout == b"first\nthird\nlast-no-newline\n"


async def test_raw_publish_is_binary_safe(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """pub --raw stores stdin as-is (NULs, no trailing newline) and sub --raw writes it back;
    plain sub shows the same chunk with its control characters escaped, newlines kept."""
    alice = add_user("alice")
    node = await start_bus()
    payload = bytes(range(256)) * 3
    result = await run_ssh(node.port, alice.key_file, "pub", "alice/blob", "--raw", stdin=payload)
    assert result.code == 0
    replay = await run_ssh(
        node.port, alice.key_file, "sub", "alice/blob", "--since", "all", "--count", "1", "--raw"
    )
    assert replay.stdout == payload
    shown = await run_ssh(
        node.port, alice.key_file, "sub", "alice/blob", "--since", "all", "--count", "1"
    )
    assert shown.stdout == escape_controls(payload)
    assert b"\\e" in shown.stdout
    assert b"\n" in shown.stdout
    assert b"\x1b" not in shown.stdout


_HOSTILE = [
    b"\x1b]0;you have been pwned\x07",  # window title
    b"\x1b]52;c;cm0gLXJmIH4=\x07",  # OSC 52: write the viewer's clipboard
    b"\x1b[2J\x1b[Hfake prompt",  # clear the screen
    b"evil-purge\rharmless-line",  # hide text behind a carriage return
    b"c1 csi \xc2\x9b2J and del \x7f, tab\tstays",
]
_SHOWN = [
    b"\\e]0;you have been pwned\\x07",
    b"\\e]52;c;cm0gLXJmIH4=\\x07",
    b"\\e[2J\\e[Hfake prompt",
    b"evil-purge\\x0dharmless-line",
    b"c1 csi \\xc2\\x9b2J and del \\x7f, tab\tstays",
]


async def test_plain_sub_shows_control_characters_as_escapes(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """Live (the fan-out's express path) and replayed, plain sub never writes a control
    character but tab and newline; sub --raw writes the bytes as published."""
    alice = add_user("alice")
    bob = add_user("bob")
    node = await start_bus(acl=[{"topics": ["news"], "publish": ["*"], "subscribe": ["*"]}])
    live = await subscribe(node.port, bob.key_file, "news")
    live_raw = await subscribe(node.port, bob.key_file, "news", "--raw")
    await wait_subscribed(node.bus, "news", 2)
    stdin = b"".join(line + b"\n" for line in _HOSTILE)
    assert (await run_ssh(node.port, alice.key_file, "pub", "news", stdin=stdin)).code == 0
    assert await live.lines(len(_SHOWN)) == _SHOWN
    assert await live_raw.lines(len(_HOSTILE)) == _HOSTILE
    replay = await run_ssh(
        node.port, bob.key_file, "sub", "news", "--since", "all", "--count", str(len(_HOSTILE))
    )
    assert replay.stdout == b"".join(line + b"\n" for line in _SHOWN)


async def test_json_sub_escapes_line_separators_and_c1(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """sub --json writes U+2028, U+2029, U+0085, U+FEFF and controls as \\u escapes."""
    alice = add_user("alice")
    node = await start_bus()
    message = "a\u2028b\u2029c\u0085d\ufeffe\x1bf\x7fg"
    await run_ssh(node.port, alice.key_file, "pub", "alice/j", stdin=message.encode() + b"\n")
    replay = await run_ssh(
        node.port, alice.key_file, "sub", "alice/j", "--since", "all", "--count", "1", "--json"
    )
    assert json.loads(replay.stdout)["data"] == message
    assert replay.stdout.isascii()
    assert all(control not in replay.stdout for control in (b"\x1b", b"\x7f"))


async def test_sub_raw_and_json_together_is_a_usage_error(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """--raw and --json choose two different outputs: asking for both exits 64."""
    alice = add_user("alice")
    node = await start_bus()
    result = await run_ssh(node.port, alice.key_file, "sub", "alice/j", "--raw", "--json")
    assert result.code == 64
    assert "--raw and --json" in result.stderr


async def test_json_records_carry_id_time_topic_user_data(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """sub --json writes one object per line with the publisher's user name."""
    acme = add_user("acme")
    node = await start_bus()
    await run_ssh(node.port, acme.key_file, "pub", "cache-drain", stdin=b"acme-blog\n")
    replay = await run_ssh(
        node.port, acme.key_file, "sub", "cache-drain", "--since", "all", "--count", "1", "--json"
    )
    record = json.loads(replay.stdout)
    assert set(record) == {"id", "time", "topic", "user", "data"}
    assert (record["topic"], record["user"], record["data"]) == ("cache-drain", "acme", "acme-blog")
    assert record["time"].endswith("Z")


@pytest.mark.parametrize("since", ["all", "10m", "2026-01-01T00:00:00Z", "0-1"])
async def test_since_replays_history(
    start_bus: StartBus, add_user: Callable[[str], User], since: str
) -> None:
    """--since (all, a duration, an RFC 3339 time, a stream id) replays stored messages."""
    alice = add_user("alice")
    node = await start_bus()
    await run_ssh(node.port, alice.key_file, "pub", "alice/h", stdin=b"one\ntwo\n")
    replay = await run_ssh(
        node.port, alice.key_file, "sub", "alice/h", "--since", since, "--count", "2"
    )
    assert replay.stdout == b"one\ntwo\n"


async def test_since_a_stream_id_resumes_after_it(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """--since ID delivers only messages after ID: a subscriber can resume where it was."""
    alice = add_user("alice")
    node = await start_bus()
    await run_ssh(node.port, alice.key_file, "pub", "alice/r", stdin=b"one\ntwo\nthree\n")
    first = await run_ssh(
        node.port, alice.key_file, "sub", "alice/r", "--since", "all", "--count", "1", "--json"
    )
    last_id = json.loads(first.stdout)["id"]
    rest = await run_ssh(
        node.port, alice.key_file, "sub", "alice/r", "--since", last_id, "--count", "2"
    )
    assert rest.stdout == b"two\nthree\n"


async def test_trimmed_history_is_reported_once(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """Asking for history the stream trimmed away says so on stderr, once."""
    alice = add_user("alice")
    node = await start_bus(topics={"max_len": 1})
    # Exact trimming (MAXLEN 1, not ~) so the test does not depend on radix-node sizes.
    key = node.bus.keys.stream("alice/trim")
    for n in range(5):
        await node.bus.redis.xadd(
            key, {"d": f"m{n}", "u": "alice", "m": str(n)}, maxlen=1, approximate=False
        )
    replay = await run_ssh(
        node.port, alice.key_file, "sub", "alice/trim", "--since", "all", "--count", "1"
    )
    assert replay.stdout == b"m4\n"
    assert replay.stderr.count("was trimmed") == 1


async def test_sub_keeps_following_after_stdin_eof(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """`ssh -n bus sub` (stdin at EOF) still receives messages published later."""
    alice = add_user("alice")
    node = await start_bus()
    sub = await subscribe(node.port, alice.key_file, "alice/n", stdin_eof=True)
    await wait_subscribed(node.bus, "alice/n")
    await run_ssh(node.port, alice.key_file, "pub", "alice/n", stdin=b"later\n")
    assert await sub.line() == b"later"


async def test_ls_shows_topics_subscribers_and_hides_others(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """ls lists topics the user may read with counts and live subscribers, not others'."""
    alice = add_user("alice")
    bob = add_user("bob")
    node = await start_bus()
    await run_ssh(node.port, alice.key_file, "pub", "alice/a", stdin=b"1\n2\n")
    await run_ssh(node.port, alice.key_file, "pub", "alice/a", stdin=b"3\n")
    await run_ssh(node.port, bob.key_file, "pub", "bob/b", stdin=b"1\n")
    await subscribe(node.port, alice.key_file, "alice/a")
    await wait_subscribed(node.bus, "alice/a")
    async with asyncio.timeout(10):
        while True:
            result = await run_ssh(node.port, alice.key_file, "ls", "--json")
            rows = {r["topic"]: r for r in map(json.loads, result.stdout.splitlines())}
            if rows.get("alice/a", {}).get("subscribers") == 1:
                break
    assert "bob/b" not in rows
    assert rows["alice/a"]["entries"] == 2  # one pub's lines share an entry
    table = (await run_ssh(node.port, alice.key_file, "ls", "alice")).stdout.decode()
    assert table.splitlines()[0].startswith("TOPIC")
    assert "alice/a" in table


async def test_pty_request_is_refused(start_bus: StartBus, add_user: Callable[[str], User]) -> None:
    """ssh -tt insists on a PTY; the server refuses it (OpenSSH then gives up, exit 255)."""
    alice = add_user("alice")
    node = await start_bus()
    argv = ssh_argv(node.port, alice.key_file, "whoami")
    argv[argv.index("-T")] = "-tt"
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert "PTY allocation request failed" in err.decode()
    assert proc.returncode == 255


@pytest.mark.parametrize(
    "forward",
    [
        pytest.param(["-o", "ExitOnForwardFailure=yes", "-N", "-R", "0:127.0.0.1:9"], id="remote"),
        pytest.param(["-W", "127.0.0.1:9"], id="direct-tcpip"),
    ],
)
async def test_port_forwarding_is_refused(
    start_bus: StartBus, add_user: Callable[[str], User], forward: list[str]
) -> None:
    """Remote (-R) and direct (-W) forwarding requests are refused."""
    alice = add_user("alice")
    node = await start_bus()
    argv = ssh_argv(node.port, alice.key_file)
    host = argv.pop()
    proc = await asyncio.create_subprocess_exec(
        *argv, *forward, host, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 255
    assert "forwarding failed" in err.decode() or "administratively prohibited" in err.decode()


async def test_sftp_is_refused(start_bus: StartBus, add_user: Callable[[str], User]) -> None:
    """The sftp subsystem (and so modern scp) is not offered."""
    alice = add_user("alice")
    node = await start_bus()
    argv = ssh_argv(node.port, alice.key_file)
    sftp = shutil.which("sftp") or "/usr/bin/sftp"
    options = [a for a in argv[1:-1] if a not in ("-T", "-p", str(node.port))]
    proc = await asyncio.create_subprocess_exec(
        sftp, "-P", str(node.port), "-b", "-", *options, argv[-1],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(b"ls\n"), 30)
    assert proc.returncode != 0
    assert "subsystem request failed" in err.decode()


async def test_sessions_per_user_are_limited(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """Past max_sessions_per_user a session is refused with a message and exit 75."""
    alice = add_user("alice")
    node = await start_bus(server={"max_sessions_per_user": 1})
    await subscribe(node.port, alice.key_file, "alice/x")
    await wait_subscribed(node.bus, "alice/x")
    result = await run_ssh(node.port, alice.key_file, "whoami")
    assert result.code == 75
    assert "too many sessions for user 'alice' (limit 1)" in result.stderr


async def test_connections_are_limited(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """Past max_connections a new login's sessions are refused: the reason, and exit 75."""
    alice = add_user("alice")
    node = await start_bus(server={"max_connections": 1})
    await subscribe(node.port, alice.key_file, "alice/x")
    await wait_subscribed(node.bus, "alice/x")
    result = await run_ssh(node.port, alice.key_file, "whoami")
    assert result.code == 75
    assert "too many connections (limit 1)" in result.stderr
    assert result.stdout == b""


async def test_added_user_can_log_in_without_restart(
    start_bus: StartBus, add_user: Callable[[str], User], make_key: Callable[[str], Path],
    users_dir: Path,
) -> None:  # fmt: skip
    """A key file added to the users folder is honoured without restarting the server."""
    add_user("alice")
    node = await start_bus()
    carol_key = make_key("carol")
    assert (await run_ssh(node.port, carol_key, "whoami")).code == 255
    (users_dir / "carol.pub").write_text(carol_key.with_suffix(".pub").read_text())
    async with asyncio.timeout(10):
        while node.users.lookup(_public_key(carol_key)) is None:
            await asyncio.sleep(0.05)
    result = await run_ssh(node.port, carol_key, "whoami")
    assert "user: carol" in result.stdout.decode()
    (users_dir / "carol.pub").unlink()
    async with asyncio.timeout(10):
        while node.users.lookup(_public_key(carol_key)) is not None:
            await asyncio.sleep(0.05)
    assert (await run_ssh(node.port, carol_key, "whoami")).code == 255


def _public_key(private: Path) -> asyncssh.SSHKey:
    return asyncssh.read_public_key(private.with_suffix(".pub"))


async def test_purge_lines_with_control_characters_are_refused(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """pub cache-drain refuses a line holding a control character (exit 65), even one that
    the purge grammar would strip as whitespace; the clean line is stored."""
    acme = add_user("acme")
    node = await start_bus()
    stdin = b"acme-blog\x0c\n\x1cacme-blog\nacme-docs\x85\nacme-api\n"
    stdin = stdin.replace(b"\x85", "\x85".encode())  # NEL as UTF-8, as a terminal sends it
    result = await run_ssh(node.port, acme.key_file, "pub", "cache-drain", stdin=stdin)
    assert result.code == 65
    assert "line 1: a purge line may not contain control character '\\x0c'" in result.stderr
    assert "line 2: a purge line may not contain control character '\\x1c'" in result.stderr
    assert "line 3: a purge line may not contain control character '\\x85'" in result.stderr
    assert await node.bus.redis.xlen(node.bus.keys.stream("cache-drain")) == 1
