"""The SSH clients people use, each driven for real against the bus: the client matrix.

Every client publishes stdin lines, subscribes with ``--count`` and gets drainbus's exit codes.
A client whose program or library is missing is skipped with the reason printed; .ci/run
installs them all (scripts/_bootstrap.sh ``need_debian_packages``, the ``test`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shlex
import shutil
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import structlog
from asyncssh.kex import get_kex_algs

from drainbus import identity
from drainbus.identity import UserKeys, load_or_create_host_key
from tests.conftest import (
    Result,
    RunningBus,
    Subscriber,
    User,
    run_ssh,
    ssh_argv,
    wait_subscribed,
)

StartBus = Callable[..., Awaitable[RunningBus]]


def _host_key(node: RunningBus) -> asyncssh.SSHKey:
    return load_or_create_host_key(node.door.settings.server.host_keys_dir)


async def _run_program(argv: list[str], stdin: bytes, env: dict[str, str]) -> Result:
    """Run a client program to completion, without a terminal: a prompt fails, never hangs."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out, err.decode(errors="replace"))


@dataclass
class Client:
    """One SSH client: runs a bus command as a user and reports what it ended with.

    ``newline`` is the line ending its users type: CRLF for plink, as on Windows.
    """

    name: str
    home: Path
    newline: bytes = b"\n"
    _keys: dict[Path, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """A clean environment: its own HOME (known hosts, PuTTY's files), no agent."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)}

    async def run(self, node: RunningBus, user: User, *args: str, stdin: bytes = b"") -> Result:
        runners = {
            "openssh": self._run_openssh,
            "plink": self._run_plink,
            "dbclient": self._run_dbclient,
            "paramiko": self._run_paramiko,
            "asyncssh": self._run_asyncssh,
        }
        return await runners[self.name](node, user, list(args), stdin)

    def _converted(self, key: Path, suffix: str, argv: Callable[[str, str], list[str]]) -> Path:
        """``key`` (OpenSSH format) converted once into this client's own key format."""
        if key not in self._keys:
            out = key.with_suffix(suffix)
            subprocess.run(argv(str(key), str(out)), check=True, capture_output=True)
            self._keys[key] = out
        return self._keys[key]

    async def _run_openssh(
        self, node: RunningBus, user: User, args: list[str], stdin: bytes
    ) -> Result:
        return await run_ssh(node.port, user.key_file, *args, stdin=stdin)

    async def _run_plink(
        self, node: RunningBus, user: User, args: list[str], stdin: bytes
    ) -> Result:
        ppk = self._converted(
            user.key_file, ".ppk", lambda key, out: ["puttygen", key, "-O", "private", "-o", out]
        )
        argv = [
            "plink", "-ssh", "-batch", "-T", "-noagent", "-P", str(node.port), "-i", str(ppk),
            "-hostkey", _host_key(node).get_fingerprint(), "-l", "anyone", "127.0.0.1",
            shlex.join(args),
        ]  # fmt: skip
        return await _run_program(argv, stdin, self.env)

    async def _run_dbclient(
        self, node: RunningBus, user: User, args: list[str], stdin: bytes
    ) -> Result:
        key = self._converted(
            user.key_file,
            ".dropbear",
            lambda key, out: ["dropbearconvert", "openssh", "dropbear", key, out],
        )
        # dbclient checks ~/.ssh/known_hosts by host name alone (no port): pin this node's key.
        known = self.home / ".ssh" / "known_hosts"
        known.parent.mkdir(exist_ok=True)
        known.write_text(f"127.0.0.1 {_host_key(node).export_public_key().decode()}")
        argv = [
            "dbclient", "-T", "-i", str(key), "-p", str(node.port), "anyone@127.0.0.1",
            shlex.join(args),
        ]  # fmt: skip
        return await _run_program(argv, stdin, self.env)

    async def _run_paramiko(
        self, node: RunningBus, user: User, args: list[str], stdin: bytes
    ) -> Result:
        import paramiko  # type: ignore[import-untyped]  # paramiko ships no type hints

        host_key = paramiko.Ed25519Key(data=_host_key(node).public_data)

        def run() -> Result:
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{node.port}", host_key.get_name(), host_key)
            try:
                client.connect(
                    "127.0.0.1", node.port, username="anyone", key_filename=str(user.key_file),
                    allow_agent=False, look_for_keys=False, timeout=10,
                )  # fmt: skip
                chan_in, chan_out, chan_err = client.exec_command(shlex.join(args), timeout=30)
                # A refused session can be closed before its stdin is written: the exit
                # status says why, as with every other client.
                with contextlib.suppress(OSError):
                    chan_in.write(stdin)
                    chan_in.channel.shutdown_write()
                out, err = chan_out.read(), chan_err.read()
                return Result(chan_out.channel.recv_exit_status(), out, err.decode())
            finally:
                client.close()

        return await asyncio.to_thread(run)

    async def _run_asyncssh(
        self, node: RunningBus, user: User, args: list[str], stdin: bytes
    ) -> Result:
        return await run_asyncssh(node, user, args, stdin)


async def run_asyncssh(
    node: RunningBus, user: User, args: list[str], stdin: bytes, **options: Any
) -> Result:
    """Run a bus command with the asyncssh client; ``options`` go to ``asyncssh.connect``."""
    public = _host_key(node).export_public_key().decode()
    async with asyncssh.connect(
        "127.0.0.1", node.port, username="anyone", client_keys=[str(user.key_file)],
        known_hosts=asyncssh.import_known_hosts(f"[127.0.0.1]:{node.port} {public}"),
        agent_path=None, config=None, **options,
    ) as conn:  # fmt: skip
        process = await conn.create_process(shlex.join(args), encoding=None)
        # A refused session can be closed before its stdin is written: the exit status says why.
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(stdin)
            process.stdin.write_eof()
        done = await process.wait(timeout=30)
    assert isinstance(done.stdout, bytes)
    assert isinstance(done.stderr, bytes)
    assert done.exit_status is not None
    return Result(done.exit_status, done.stdout, done.stderr.decode())


# Each client and what it needs installed: (programs or Python modules, where they come from).
_NEEDS = {
    "openssh": (["ssh"], "Debian package openssh-client"),
    "plink": (["plink", "puttygen"], "Debian package putty-tools"),
    "dbclient": (["dbclient", "dropbearconvert"], "Debian package dropbear-bin"),
    "paramiko": (["paramiko"], "drainbus's test extra: pip install -e '.[test]'"),
    "asyncssh": (["asyncssh"], "a dependency of drainbus"),
}
_MODULES = {"paramiko", "asyncssh"}
CLIENTS = list(_NEEDS)


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Client:
    """Each client of the matrix in turn; skipped, saying why, if it is not installed."""
    name: str = request.param
    programs, source = _NEEDS[name]
    missing = [
        p
        for p in programs
        if (importlib.util.find_spec(p) if p in _MODULES else shutil.which(p)) is None
    ]
    if missing:
        pytest.skip(f"{name}: {', '.join(missing)} not installed (from {source})")
    home = tmp_path / f"home-{name}"
    home.mkdir()
    return Client(name, home, newline=b"\r\n" if name == "plink" else b"\n")


async def test_client_publishes_lines_a_live_subscriber_receives(
    client: Client, start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """The client's pub stores each stdin line (exit 0 only then); its sub --count gets them."""
    alice = add_user("alice")
    node = await start_bus()
    listening = asyncio.create_task(client.run(node, alice, "sub", "alice/t", "--count", "2"))
    try:
        await wait_subscribed(node.bus, "alice/t")
        stdin = b"alpha" + client.newline + b"beta" + client.newline
        published = await client.run(node, alice, "pub", "alice/t", stdin=stdin)
        assert (published.code, published.stdout, published.stderr) == (0, b"", "")
        received = await asyncio.wait_for(listening, 30)
    finally:
        listening.cancel()  # only if something above failed first: it ends the client
        await asyncio.wait([listening])
    assert (received.code, received.stdout, received.stderr) == (0, b"alpha\nbeta\n", "")
    # Stored, not only passed on: a replay finds both lines.
    replay = await run_ssh(node.port, alice.key_file, "sub", "alice/t", "--since", "all",
                           "--count", "2")  # fmt: skip
    assert replay.stdout == b"alpha\nbeta\n"


@pytest.mark.parametrize(
    ("args", "stdin", "code", "fragment"),
    [
        pytest.param(["pub", "bob/deploys"], b"x\n", 77, "user 'alice' may not", id="refused-77"),
        pytest.param(["frobnicate"], b"", 64, "unknown command 'frobnicate'", id="bad-command-64"),
        pytest.param(["pub", "cache-drain"], b"alice-blog\nfrob:x\n", 65, "line 2: ",
                     id="malformed-purge-65"),
    ],
)  # fmt: skip
async def test_client_gets_the_exit_code_and_the_reason(
    client: Client,
    start_bus: StartBus,
    add_user: Callable[[str], User],
    args: list[str],
    stdin: bytes,
    code: int,
    fragment: str,
) -> None:
    """A refused topic, a bad command and a malformed purge reach the client as 77, 64, 65."""
    add_user("bob")
    alice = add_user("alice")
    node = await start_bus()
    result = await client.run(node, alice, *args, stdin=stdin.replace(b"\n", client.newline))
    assert (result.code, result.stdout) == (code, b""), result.stderr
    assert fragment in result.stderr


def _read_kexinit(port: int) -> list[list[str]]:
    """The name-lists of the server's KEXINIT, which travels in clear before any key."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"SSH-2.0-drainbus-test\r\n")
        stream = sock.makefile("rb")
        banner = stream.readline()
        while banner and not banner.startswith(b"SSH-"):  # lines before the banner are allowed
            banner = stream.readline()
        assert banner, "the server closed before its SSH banner"
        length, padding = struct.unpack(">IB", stream.read(5))
        payload = stream.read(length - 1)[: length - 1 - padding]
    assert payload[0] == 20  # SSH_MSG_KEXINIT
    lists, offset = [], 17  # message type and cookie
    for _ in range(10):
        (size,) = struct.unpack(">I", payload[offset : offset + 4])
        lists.append(payload[offset + 4 : offset + 4 + size].decode().split(","))
        offset += 4 + size
    return lists


def _need_mlkem() -> None:
    if b"mlkem768x25519-sha256" not in get_kex_algs():
        pytest.skip("asyncssh here has no ML-KEM (it needs cryptography with ML-KEM, or liboqs)")


async def test_server_leads_with_dropbears_guess_and_keeps_post_quantum(
    start_bus: StartBus,
) -> None:
    """curve25519-sha256 and ssh-ed25519 lead (Dropbear's guess); mlkem768x25519 is offered."""
    _need_mlkem()
    node = await start_bus()
    kex, host_key_algs, *_ = await asyncio.to_thread(_read_kexinit, node.port)
    assert (kex[0], host_key_algs[0]) == ("curve25519-sha256", "ssh-ed25519")
    assert "mlkem768x25519-sha256" in kex


async def test_post_quantum_only_client_is_served(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """A client that accepts only mlkem768x25519-sha256 (OpenSSH 10's first choice) connects."""
    _need_mlkem()
    alice = add_user("alice")
    node = await start_bus()
    result = await run_asyncssh(node, alice, ["whoami"], b"", kex_algs=["mlkem768x25519-sha256"])
    assert result.code == 0
    assert b"user: alice" in result.stdout


@pytest.mark.parametrize("client", ["openssh", "plink", "dbclient"], indirect=True)
async def test_unknown_key_fails_and_stores_nothing(
    client: Client,
    start_bus: StartBus,
    add_user: Callable[[str], User],
    make_key: Callable[[str], Path],
) -> None:
    """A key in no user's file: the program exits non-zero and nothing is published."""
    alice = add_user("alice")
    node = await start_bus()
    stranger = User("alice", make_key("stranger"))
    result = await client.run(node, stranger, "pub", "alice/t", stdin=b"x" + client.newline)
    assert result.code != 0
    topics = await run_ssh(node.port, alice.key_file, "ls")
    assert topics.code == 0
    assert b"alice/t" not in topics.stdout


async def test_client_over_the_connection_limit_exits_75_and_stores_nothing(
    client: Client,
    start_bus: StartBus,
    add_user: Callable[[str], User],
    subscribe: Callable[..., Awaitable[Subscriber]],
) -> None:
    """Refused by a connection limit, every client (dbclient too) says why and exits 75."""
    alice = add_user("alice")
    node = await start_bus(server={"max_connections_per_user": 1})
    await subscribe(node.port, alice.key_file, "alice/other")
    await wait_subscribed(node.bus, "alice/other")
    result = await client.run(node, alice, "pub", "alice/t", stdin=b"x" + client.newline)
    assert (result.code, result.stdout) == (75, b""), result.stderr
    assert "too many connections for user 'alice' (limit 1)" in result.stderr
    stored = await node.bus.redis.exists(node.bus.keys.stream("alice/t"))
    assert stored == 0


# --- algorithms: what current OpenSSH offers, nothing weaker --------------------------------

_OPENSSH_10_KEX = {
    "mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256", "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "ecdh-sha2-nistp521",
}  # fmt: skip
_KEX_MARKERS = {"ext-info-s", "kex-strict-s-v00@openssh.com"}  # not algorithms: extensions


async def test_server_offers_openssh_defaults_and_nothing_weaker(start_bus: StartBus) -> None:
    """Key exchanges are OpenSSH 10's server defaults (no finite-field DH, no SHA-1); MACs
    hold no SHA-1 or MD5; the ciphers are AES-GCM and AES-CTR."""
    node = await start_bus()
    kex, host_key_algs, cipher_cs, cipher_sc, mac_cs, mac_sc, *_ = await asyncio.to_thread(
        _read_kexinit, node.port
    )
    assert set(kex) - _KEX_MARKERS <= _OPENSSH_10_KEX
    assert "curve25519-sha256" in kex
    assert host_key_algs == ["ssh-ed25519"]
    assert cipher_cs == cipher_sc
    assert set(cipher_cs) <= {"aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                              "aes128-ctr", "aes256-ctr"}  # fmt: skip
    assert mac_cs == mac_sc
    assert "hmac-sha2-256-etm@openssh.com" in mac_cs
    assert [m for m in mac_cs if "sha1" in m or "md5" in m] == []


def _openssh_key(tmp_path: Path, kind: str, bits: int | None = None) -> Path:
    """A key of ``kind`` (rsa, dsa) from the real ssh-keygen."""
    path = tmp_path / f"{kind}{bits or ''}"
    size = ["-b", str(bits)] if bits else []
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *size, "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path


def _user_with_key(users_dir: Path, name: str, key: Path) -> User:
    (users_dir / f"{name}.pub").write_text(key.with_suffix(".pub").read_text())
    return User(name, key)


async def _openssh(node: RunningBus, user: User, *options: str) -> Result:
    argv = ssh_argv(node.port, user.key_file, "whoami")
    argv[1:1] = options
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Result(proc.returncode, out, err.decode(errors="replace"))


@pytest.mark.parametrize(
    ("options", "key", "allowed"),
    [
        pytest.param([], "ed25519", True, id="defaults"),
        pytest.param([], "rsa2048", True, id="rsa-2048-sha2"),
        pytest.param(["-o", "KexAlgorithms=diffie-hellman-group14-sha1"], "ed25519", False,
                     id="kex-group14-sha1"),
        pytest.param(["-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha1"], "ed25519", False,
                     id="mac-hmac-sha1"),
        pytest.param(["-o", "PubkeyAcceptedAlgorithms=ssh-rsa"], "rsa2048", False,
                     id="ssh-rsa-sha1-signature"),
        pytest.param([], "rsa1024", False, id="rsa-1024-key"),
        pytest.param(["-o", "PubkeyAcceptedAlgorithms=+ssh-dss"], "dsa", False, id="dsa-key"),
    ],
)  # fmt: skip
async def test_weak_algorithms_and_keys_are_refused_to_openssh(
    start_bus: StartBus,
    users_dir: Path,
    make_key: Callable[[str], Path],
    tmp_path: Path,
    options: list[str],
    key: str,
    allowed: bool,
) -> None:
    """An OpenSSH client that insists on SHA-1 key exchange, MAC or signature, or holds a
    DSA or RSA-1024 key, cannot log in; the same client with OpenSSH's defaults can."""
    keys = {
        "ed25519": lambda: make_key("ed"),
        "rsa2048": lambda: _openssh_key(tmp_path, "rsa", 2048),
        "rsa1024": lambda: _openssh_key(tmp_path, "rsa", 1024),
        "dsa": lambda: _openssh_key(tmp_path, "dsa"),
    }
    alice = _user_with_key(users_dir, "alice", keys[key]())
    node = await start_bus()

    result = await _openssh(node, alice, *options)

    if allowed:
        assert (result.code, b"user: alice" in result.stdout) == (0, True), result.stderr
    else:
        assert result.code == 255
        assert b"user: alice" not in result.stdout


async def test_server_refuses_an_rsa_signature_with_sha1(
    start_bus: StartBus, users_dir: Path, tmp_path: Path
) -> None:
    """A client that signs with ssh-rsa (SHA-1) although the server does not offer it is
    refused by the server itself, not only by well-behaved clients."""
    alice = _user_with_key(users_dir, "alice", _openssh_key(tmp_path, "rsa", 2048))
    node = await start_bus()
    [keypair] = asyncssh.load_keypairs([str(alice.key_file)])
    keypair.set_sig_algorithm(b"ssh-rsa")
    public = _host_key(node).export_public_key().decode()

    with pytest.raises(asyncssh.PermissionDenied):
        async with asyncssh.connect(
            "127.0.0.1", node.port, username="anyone", client_keys=[keypair],
            known_hosts=asyncssh.import_known_hosts(f"[127.0.0.1]:{node.port} {public}"),
            agent_path=None, config=None, signature_algs=["ssh-rsa"],
        ):  # fmt: skip
            pass


async def test_weak_keys_are_refused_at_load_with_a_reason(
    users_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RSA under 2048 bits and DSA keys are logged as key_refused, saying why, and not loaded."""
    rsa = _openssh_key(tmp_path, "rsa", 1024).with_suffix(".pub").read_text()
    dsa = _openssh_key(tmp_path, "dsa").with_suffix(".pub").read_text()
    (users_dir / "alice.pub").write_text(rsa + dsa)
    users = UserKeys(users_dir)

    # A fresh logger: one cached after an earlier test configured logging would bypass capture.
    monkeypatch.setattr(identity, "log", structlog.get_logger(identity.__name__))
    with structlog.testing.capture_logs() as events:
        users.load()

    reasons = [e["reason"] for e in events if e["event"] == "key_refused"]
    assert reasons == [
        "RSA keys need at least 2048 bits; this one has 1024",
        "DSA keys are refused (1024 bits and SHA-1; OpenSSH 10 removed them)",
    ]
    assert users.users == {"alice": []}
