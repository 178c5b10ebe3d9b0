"""Publishing from outside the bus: `drainbus pub`, `drainbus hook watch`, `drainbus hook git`.

Real things throughout: the in-process bus on a free port, `drainbus` run as a process,
inotify on a temp tree, git pushing to a bare repository with a post-receive hook.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from drainbus.errors import StartupError, UsageError
from drainbus.hooks.git import RefUpdate, parse_ref_updates, purges_for
from drainbus.hooks.keys import KeyTemplate
from drainbus.hooks.settings import HooksSettings
from drainbus.hooks.spool import Spool
from drainbus.hooks.watch import Attempt, Debouncer, Watcher
from tests.conftest import Result, RunningBus, ServeProcess, Subscriber, User, run_ssh
from tests.nginx_env import NginxEnv
from tests.test_drain import drain_config, prime
from tests.test_receipts import named

StartBus = Callable[..., Awaitable[RunningBus]]
Subscribe = Callable[..., Awaitable[Subscriber]]
AddUser = Callable[[str], User]

ZERO = "0" * 40
SHA_A = "a" * 40
SHA_B = "b" * 40


# --- helpers ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on (as long as nobody grabs it in the meantime)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def known_hosts_for(node: RunningBus, tmp_path: Path) -> Path:
    """A known_hosts file trusting the test bus's host key on its port."""
    host_key = node.door.settings.server.host_keys_dir / "ssh_host_ed25519_key.pub"
    path = tmp_path / "known_hosts"
    path.write_text(f"[127.0.0.1]:{node.port} {host_key.read_text().strip()}\n")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the developer's DRAINBUS_* settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DRAINBUS_")}
    return {**env, **extra}


async def drainbus(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> Result:
    """Run `python -m drainbus ARGS` to completion (the bus keeps running in this loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drainbus", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env or clean_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return Result(proc.returncode, out, err.decode(errors="replace"))


def bus_args(port: int, key: Path) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--key", str(key)]


def hooks_settings(port: int, user: User, tmp_path: Path, **overrides: Any) -> HooksSettings:
    """Settings for a watcher in this test; host-key checking off (the tests of `pub` check it)."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "key": user.key_file,
        "known_hosts": "none",
        "spool": tmp_path / "state" / "spool",
        "debounce": 0.2,
        **overrides,
    }
    return HooksSettings(**values)


@asynccontextmanager
async def running(watcher: Watcher) -> AsyncIterator[Watcher]:
    """Run the watcher until the block ends; entered once it is watching."""
    async with anyio.create_task_group() as task_group:
        await task_group.start(watcher.run)
        yield watcher
        task_group.cancel_scope.cancel()


async def next_delivery(attempts: asyncio.Queue[Attempt], timeout: float = 10) -> Attempt:
    """The next attempt that the bus stored, skipping failed ones."""
    async with asyncio.timeout(timeout):
        while not (attempt := await attempts.get()).delivered:
            pass
    return attempt


async def delivered_keys(attempts: asyncio.Queue[Attempt], expected: set[str]) -> set[str]:
    """Keys of the deliveries up to the one that completes ``expected`` (batching may vary)."""
    keys: set[str] = set()
    while not expected <= keys:
        keys.update((await next_delivery(attempts)).keys)
    return keys


def make_sites(root: Path, *sites: str) -> None:
    for site in sites:
        (root / site).mkdir(parents=True)
        (root / site / "index.html").write_text("hello")


# --- drainbus pub ----------------------------------------------------------------------


async def test_pub_messages_and_stdin_lines_arrive(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """Each MSG, and each line of stdin, becomes one message, in order, silently with exit 0."""
    acme = add_user("acme")
    node = await start_bus()
    env = clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(known_hosts_for(node, tmp_path)))
    args = ["pub", *bus_args(node.port, acme.key_file), "cache-drain"]

    by_args, by_stdin = await asyncio.gather(
        drainbus(*args, "acme-blog", "acme-shop", env=env),
        drainbus(*args, stdin=b"acme-docs\r\n\nacme-api", env=env),
    )

    assert (by_args.code, by_args.stdout, by_args.stderr) == (0, b"", "")
    assert (by_stdin.code, by_stdin.stdout, by_stdin.stderr) == (0, b"", "")
    got = await run_ssh(node.port, acme.key_file, "sub", "cache-drain", "--since", "all",
                        "--count", "4")  # fmt: skip
    lines = got.stdout.splitlines()
    assert sorted(lines) == [b"acme-api", b"acme-blog", b"acme-docs", b"acme-shop"]
    assert lines.index(b"acme-blog") < lines.index(b"acme-shop")
    assert lines.index(b"acme-docs") < lines.index(b"acme-api")


async def test_pub_exits_and_reports_like_the_server(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """For refused input, `drainbus pub` ends with ssh's exit code and the server's stderr."""
    acme = add_user("acme")
    node = await start_bus(server={"max_message_bytes": 100})
    env = clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(known_hosts_for(node, tmp_path)))
    cases = {
        "forbidden topic": ("other-team", b"hello\n", 77),
        "line over max_message_bytes": ("acme", b"x" * 300 + b"\nfine\n", 65),
        "purge outside the user's scope": ("cache-drain", b"acme-blog\nbeta-blog\n", 77),
        "invalid topic name": ("a..b", b"x\n", 64),
    }

    async def both(topic: str, stdin: bytes) -> tuple[Result, Result]:
        return await asyncio.gather(
            drainbus("pub", *bus_args(node.port, acme.key_file), topic, stdin=stdin, env=env),
            run_ssh(node.port, acme.key_file, "pub", topic, stdin=stdin),
        )

    results = await asyncio.gather(*(both(topic, stdin) for topic, stdin, _ in cases.values()))
    for (name, (_, _, code)), (ours, theirs) in zip(cases.items(), results, strict=True):
        assert (name, ours.code, ours.stderr) == (name, code, theirs.stderr)
        assert theirs.code == code, name
        assert ours.stderr.strip(), name


async def test_pub_without_a_session_exits_69_with_one_line(
    start_bus: StartBus, add_user: AddUser, make_key: Callable[[str], Path], tmp_path: Path
) -> None:
    """No bus, an unregistered key, an untrusted host key: exit 69, one line naming why."""
    acme = add_user("acme")
    stranger = make_key("stranger")
    node = await start_bus()
    trusted = clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(known_hosts_for(node, tmp_path)))
    (tmp_path / "empty_known_hosts").write_text("")
    untrusted = clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(tmp_path / "empty_known_hosts"))
    down = free_port()

    no_bus, bad_key, bad_host_key = await asyncio.gather(
        drainbus("pub", *bus_args(down, acme.key_file), "cache-drain", "acme-x", env=trusted),
        drainbus("pub", *bus_args(node.port, stranger), "cache-drain", "acme-x", env=trusted),
        drainbus("pub", *bus_args(node.port, acme.key_file), "cache-drain", "acme-x",
                 env=untrusted),
    )  # fmt: skip

    assert (no_bus.code, no_bus.stderr) == (
        69, f"drainbus: cannot publish to the bus at 127.0.0.1:{down}: connection refused\n"
    )  # fmt: skip
    assert bad_key.code == 69
    assert f"127.0.0.1:{node.port}" in bad_key.stderr
    assert f"key {stranger} is not accepted" in bad_key.stderr
    assert bad_host_key.code == 69
    assert "host key is not in" in bad_host_key.stderr
    assert "ssh-keyscan" in bad_host_key.stderr
    for ran in (no_bus, bad_key, bad_host_key):
        assert ran.stderr.count("\n") == 1, ran


# --- drainbus hook watch ---------------------------------------------------------------


async def test_deploy_burst_publishes_each_changed_site_once(
    start_bus: StartBus, add_user: AddUser, subscribe: Subscribe, tmp_path: Path
) -> None:
    """Hundreds of writes, renames, deletes and a new site give one purge per changed site."""
    root = add_user("root")  # an admin: may purge every site
    node = await start_bus()
    sites = tmp_path / "sites"
    make_sites(sites, "acme/blog", "acme/shop", "beta/www", "delta/old", "omega/v1", "zeta/quiet")
    sub = await subscribe(node.port, root.key_file, "cache-drain", "--since", "all")
    settings = hooks_settings(node.port, root, tmp_path, debounce=0.5)
    attempts: asyncio.Queue[Attempt] = asyncio.Queue()
    watcher = Watcher(sites, settings, on_attempt=attempts.put_nowait)

    def deploy() -> None:
        for number in range(500):
            (sites / "acme/blog" / f"page-{number}.html").write_text("new")
        for number in range(3):
            (sites / "beta/www" / f"style-{number}.css").write_text("new")
        (sites / "acme/shop/index.html").rename(sites / "acme/shop/home.html")
        shutil.rmtree(sites / "delta/old")
        (sites / "omega/v1").rename(sites / "omega/v2")  # a site renamed: both keys
        (sites / "omega/v2/index.html").write_text("new")
        (sites / "gamma/new/assets").mkdir(parents=True)  # a site that appears
        (sites / "gamma/new/assets/app.js").write_text("new")
        (sites / "notes.txt").write_text("not deep enough for {0}-{1}")
        (sites / "acme/.git").mkdir()  # a hidden folder is not a site
        (sites / "acme/.git/HEAD").write_text("ref: refs/heads/main")
        # Last: inotify keeps order, so once this is published everything above was seen.
        (sites / "zz/sentinel").mkdir(parents=True)

    async with running(watcher):
        await anyio.to_thread.run_sync(deploy)
        while "zz-sentinel" not in (await next_delivery(attempts)).keys:
            pass
        assert watcher.pending == frozenset()
        assert settings.spool_path.read_text() == ""

    lines: list[bytes] = []
    while not lines or lines[-1] != b"zz-sentinel":
        lines.append(await sub.line())
    changed = ["acme-blog", "acme-shop", "beta-www", "delta-old", "gamma-new", "omega-v1",
               "omega-v2", "zz-sentinel"]  # fmt: skip
    assert Counter(lines) == {key.encode(): 1 for key in changed}


async def test_outage_is_spooled_and_delivered_when_the_bus_comes_up(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """With the bus down, keys wait in the spool file; once it is up they are stored."""
    root = add_user("root")
    port = free_port()
    sites = tmp_path / "sites"
    make_sites(sites, "acme/blog")
    settings = hooks_settings(port, root, tmp_path)
    attempts: asyncio.Queue[Attempt] = asyncio.Queue()
    watcher = Watcher(
        sites, settings, on_attempt=attempts.put_nowait, retry_initial=0.05, retry_max=0.2
    )

    async with running(watcher):
        (sites / "acme/blog/index.html").write_text("changed")
        failed = await asyncio.wait_for(attempts.get(), 10)
        assert (failed.keys, failed.exit_code) == (("acme-blog",), 69)
        assert "connection refused" in failed.message
        assert settings.spool_path.read_text() == "acme-blog\n"

        node = await start_bus(server={"listen": f"127.0.0.1:{port}"})
        delivered = await next_delivery(attempts)

    assert delivered.keys == ("acme-blog",)
    assert settings.spool_path.read_text() == ""
    got = await run_ssh(node.port, root.key_file, "sub", "cache-drain", "--since", "all",
                        "--count", "1")  # fmt: skip
    assert got.stdout == b"acme-blog\n"


async def test_keys_left_in_the_spool_by_a_crash_are_sent_at_start(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """A restart publishes what the previous run had not got stored, without any change."""
    root = add_user("root")
    node = await start_bus()
    settings = hooks_settings(node.port, root, tmp_path)
    settings.spool_path.parent.mkdir(parents=True)
    settings.spool_path.write_text("acme-blog\nacme-sh")  # cut short by the crash
    (tmp_path / "sites").mkdir()
    attempts: asyncio.Queue[Attempt] = asyncio.Queue()

    async with running(Watcher(tmp_path / "sites", settings, on_attempt=attempts.put_nowait)):
        delivered = await next_delivery(attempts)

    assert delivered.keys == ("acme-blog", "acme-sh")
    assert settings.spool_path.read_text() == ""


async def test_missing_folder_is_waited_for_and_its_removal_purges(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """A folder that appears after start is watched; its sites are purged when it goes."""
    root = add_user("root")
    node = await start_bus()
    sites = tmp_path / "sites"
    attempts: asyncio.Queue[Attempt] = asyncio.Queue()
    watcher = Watcher(
        sites,
        hooks_settings(node.port, root, tmp_path, debounce=0.05),
        on_attempt=attempts.put_nowait,
        root_poll_interval=0.05,
    )

    both = {"acme-blog", "beta-www"}
    async with running(watcher):
        make_sites(sites, "acme/blog", "beta/www")
        assert await delivered_keys(attempts, both) == both
        shutil.rmtree(sites)
        assert await delivered_keys(attempts, both) == both


async def test_hook_watch_command_publishes_and_stops_on_sigterm(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """`drainbus hook watch DIR` publishes a changed site's key and exits 0 on SIGTERM."""
    root = add_user("root")
    node = await start_bus()
    sites = tmp_path / "sites"
    make_sites(sites, "acme/blog")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drainbus", "--log-json", "hook", "watch", str(sites),
        "--key-from", "{1}.{0}", "--debounce", "50ms", "--spool", str(tmp_path / "spool"),
        *bus_args(node.port, root.key_file),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(known_hosts_for(node, tmp_path))),
    )  # fmt: skip
    watcher = ServeProcess(proc)
    try:
        await watcher.wait_for_event("hook_watching")
        (sites / "acme/blog/index.html").write_text("changed")
        await watcher.wait_for_event("hook_published")
    finally:
        if proc.returncode is None:
            proc.terminate()
        code = await asyncio.wait_for(proc.wait(), 10)
        await watcher.reader

    assert code == 0
    got = await run_ssh(node.port, root.key_file, "sub", "cache-drain", "--since", "all",
                        "--count", "1")  # fmt: skip
    assert got.stdout == b"blog.acme\n"


def test_a_spool_has_one_watcher_at_a_time(tmp_path: Path) -> None:
    """A second watcher on the same spool file is refused with StartupError."""
    path = tmp_path / "state" / "spool"
    with Spool(path) as first:
        first.add(["acme-blog"])
        with pytest.raises(StartupError, match="in use by another"), Spool(path):
            pass
    with Spool(path) as again:
        assert again.keys == {"acme-blog"}


def test_debounce_sends_a_burst_once_and_caps_the_wait() -> None:
    """A key is due once quiet for `quiet` seconds, or `max_wait` after its first change."""
    debouncer = Debouncer(quiet=2.0, max_wait=10.0)
    assert debouncer.mark("acme-blog", now=0.0) is True
    for tick in range(1, 50):  # a change every 0.1 s for 5 s
        assert debouncer.mark("acme-blog", now=tick / 10) is False
    assert debouncer.due(now=6.8) == []
    assert debouncer.next_due() == pytest.approx(6.9)
    assert debouncer.due(now=6.9) == ["acme-blog"]
    assert debouncer.next_due() is None

    for tick in range(120):  # never quiet: still due 10 s after the first change
        debouncer.mark("beta-www", now=100 + tick / 10)
    assert debouncer.due(now=109.9) == []
    assert debouncer.due(now=110.0) == ["beta-www"]


@pytest.mark.parametrize(
    ("template", "path", "key"),
    [
        ("{0}-{1}", "acme/blog/index.html", "acme-blog"),
        ("{0}-{1}", "acme/blog", "acme-blog"),
        ("{0}-{1}", "acme", None),
        ("{1}.{0}", "acme/blog/css/a.css", "blog.acme"),
        ("{0}", "acme/blog", "acme"),
        ("{0}-{1}", "acme/.git/HEAD", None),
        ("{0}-{1}", "acme/my blog/x", None),
        ("site-{0}", "*/x", None),
    ],
    ids=["file", "site-folder", "too-shallow", "reordered", "one-segment", "hidden", "space",
         "glob-name"],
)  # fmt: skip
def test_key_template_maps_paths_to_keys(template: str, path: str, key: str | None) -> None:
    """A path's key comes from its first segments; unusable names give no key."""
    assert KeyTemplate(template).key_for(Path(path).parts) == key


@pytest.mark.parametrize(
    "template",
    ["acme-blog", "{site}-{1}", "{0!r}", "{0:>5}", "{0} {1}", "tag:{0}", "{0"],
    ids=["no-placeholder", "named", "conversion", "format-spec", "space", "purge-form", "broken"],
)
def test_key_template_refuses_what_cannot_make_a_key(template: str) -> None:
    """A template must use {N} placeholders and render a bare purge key."""
    with pytest.raises(UsageError, match="key template"):
        KeyTemplate(template)


# --- drainbus hook git -----------------------------------------------------------------


def test_post_receive_input_maps_pushed_branches_to_purges() -> None:
    """Created and moved refs give their purge lines once, in push order; deletions none."""
    updates = parse_ref_updates(
        f"{ZERO} {SHA_A} refs/heads/staging\n"
        f"{SHA_A} {SHA_B} refs/heads/main\n"
        f"{SHA_A} {ZERO} refs/heads/old\n"
        f"{SHA_A} {SHA_B} refs/tags/v1\n"
    )
    branches = {
        "refs/heads/main": ("acme-blog", "acme-docs"),
        "refs/heads/staging": ("acme-staging", "acme-blog"),
        "refs/heads/old": ("acme-old",),
    }
    assert updates[2] == RefUpdate(SHA_A, ZERO, "refs/heads/old")
    assert updates[2].deleted
    assert purges_for(updates, branches) == ["acme-staging", "acme-blog", "acme-docs"]


def test_branch_names_in_settings_are_refs() -> None:
    """`main` means refs/heads/main; a string is one purge line; "none" turns checks off."""
    settings = HooksSettings(
        branches={"main": "acme-blog", "refs/heads/x": ["acme-x", "acme-y"]}, known_hosts="none"
    )
    assert settings.branches == {
        "refs/heads/main": ("acme-blog",),
        "refs/heads/x": ("acme-x", "acme-y"),
    }
    assert settings.known_hosts is None


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.org", *args],
        cwd=cwd, check=True, capture_output=True,
    )  # fmt: skip


async def test_push_runs_post_receive_and_purges_the_pushed_branches(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """A real push of main and staging publishes their configured keys from post-receive."""
    acme = add_user("acme")
    node = await start_bus()
    config = tmp_path / "drainbus.toml"
    config.write_text(
        "[hooks]\n"
        f'host = "127.0.0.1"\nport = {node.port}\nkey = "{acme.key_file}"\n'
        f'known_hosts = "{known_hosts_for(node, tmp_path)}"\n'
        'branches = { main = "acme-blog", "refs/heads/staging" = "acme-staging" }\n'
    )
    remote = tmp_path / "site.git"
    git("init", "--bare", "--quiet", str(remote), cwd=tmp_path)
    hook = remote / "hooks" / "post-receive"
    hook.write_text(
        f'#!/bin/sh\nDRAINBUS_CONFIG="{config}" exec "{sys.executable}" -m drainbus hook git\n'
    )
    hook.chmod(0o755)
    work = tmp_path / "work"
    git("init", "--quiet", "--initial-branch=main", str(work), cwd=tmp_path)
    (work / "index.html").write_text("hello")
    git("add", "index.html", cwd=work)
    git("commit", "--quiet", "-m", "first", cwd=work)
    git("branch", "staging", cwd=work)

    push = await asyncio.create_subprocess_exec(
        "git", "push", "--quiet", str(remote), "main", "staging",
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    _, push_err = await asyncio.wait_for(push.communicate(), 30)

    assert (push.returncode, push_err.decode()) == (0, "")  # the hook said nothing: exit 0
    got = await run_ssh(node.port, acme.key_file, "sub", "cache-drain", "--since", "all",
                        "--count", "2")  # fmt: skip
    assert sorted(got.stdout.splitlines()) == [b"acme-blog", b"acme-staging"]


async def test_git_hook_exit_codes(start_bus: StartBus, add_user: AddUser, tmp_path: Path) -> None:
    """Nothing configured pushed: exit 0 without connecting; a refused purge: the bus's 77."""
    acme = add_user("acme")
    node = await start_bus()
    env = clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(known_hosts_for(node, tmp_path)))
    pushed_main = f"{SHA_A} {SHA_B} refs/heads/main\n".encode()
    deleted_main = f"{SHA_A} {ZERO} refs/heads/main\n{SHA_A} {SHA_B} refs/heads/dev\n".encode()

    ignored, refused = await asyncio.gather(
        # The port is closed: had it tried to publish, it would exit 69.
        drainbus("hook", "git", *bus_args(free_port(), acme.key_file), "--branch",
                 "main=acme-blog", stdin=deleted_main, env=env),
        drainbus("hook", "git", *bus_args(node.port, acme.key_file), "--branch",
                 "main=beta-blog", stdin=pushed_main, env=env),
    )  # fmt: skip

    assert (ignored.code, ignored.stderr) == (0, "")
    assert refused.code == 77
    assert "beta-blog" in refused.stderr


async def test_pub_and_git_hook_wait_for_receipts(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path, nginx_env: NginxEnv
) -> None:
    """`drainbus pub --wait` and a git hook with `wait` print what each drain node did."""
    acme = add_user("acme")
    node = await start_bus(drain=named(drain_config(nginx_env)))
    prime(nginx_env)
    env = clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(known_hosts_for(node, tmp_path)))
    args = bus_args(node.port, acme.key_file)

    waited = await drainbus("pub", *args, "cache-drain", "acme-blog", "--wait", env=env)
    assert (waited.code, waited.stderr) == (0, "")
    assert waited.stdout.decode().startswith("web1 pages: 5 objects evicted in ")
    assert nginx_env.get("/", "acme-blog.pages.example").cache == "MISS"

    as_json = await drainbus("pub", *args, "--wait=5s", "--json", "cache-drain",
                             stdin=b"acme-blog2\n", env=env)  # fmt: skip
    assert as_json.code == 0
    assert json.loads(as_json.stdout)["result"] == "evicted"

    pushed_main = f"{SHA_A} {SHA_B} refs/heads/main\n".encode()
    env["DRAINBUS_HOOKS__WAIT"] = "5s"
    hooked = await drainbus("hook", "git", *args, "--branch", "main=acme-blog",
                            stdin=pushed_main, env=env)  # fmt: skip
    # The MISS checked above cached "/" again: the push's purge evicts that one object.
    assert hooked.code == 0
    assert hooked.stdout.startswith(b"web1 pages: 1 object evicted in ")

    del env["DRAINBUS_HOOKS__WAIT"]
    lonely = await drainbus("pub", *args, "--json", "cache-drain", "acme-x", env=env)
    assert lonely.code == 64
    assert "use it with --wait" in lonely.stderr
