"""The SSH publisher client that ``drainbus pub`` and the hooks share.

It runs the bus's own ``pub TOPIC`` command over asyncssh, so a publish from here ends exactly
as ``echo … | ssh bus pub TOPIC`` would: the server's exit code and stderr. Only what ``ssh``
reports as exit 255 (no connection, host key not trusted, key refused) becomes
:class:`BusUnreachable`, exit 69, with one line naming the bus and the reason::

    client = BusClient(settings)          # reads the key now: ConfigError if it cannot
    async with client.connect() as session:
        result = await session.publish("cache-drain", ["acme-blog"])

No ``~/.ssh/config`` is read: the ``[hooks]`` settings are the whole story.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import BinaryIO

import anyio
import asyncssh

from drainbus.errors import BackendError, ConfigError, ExitCode, UsageError
from drainbus.hooks.settings import HooksSettings

__all__ = [
    "PERMANENT_EXIT_CODES",
    "BusClient",
    "BusSession",
    "BusUnreachable",
    "PublishResult",
]

PERMANENT_EXIT_CODES = frozenset({ExitCode.USAGE, ExitCode.DATAERR, ExitCode.NOPERM})
"""Exit codes that sending the same lines again cannot change (usage, bad data, refused)."""

_CHUNK = 64 * 1024
# drainbus.bus.limits.PublishRefused.summary: a refusal stores a prefix of what was sent.
_REFUSAL_LINE = re.compile(r"^drainbus: (\d+) message\(s\) stored, \d+ refused", re.MULTILINE)
_STDERR_KEPT = 64 * 1024  # of the server's stderr, for logs; the rest is only passed through


class BusUnreachable(BackendError):
    """No session with the bus: connection refused or timed out, host key not trusted, key
    refused, or the connection lost mid-way. Exit 69; retrying may succeed."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot publish to the bus at {address}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PublishResult:
    """How the server's ``pub`` ended: its exit code and (the start of) its stderr."""

    exit_code: int
    stderr: str = ""

    @property
    def ok(self) -> bool:
        """True when every line was stored (exit 0)."""
        return self.exit_code == 0

    @property
    def stored_before_refusal(self) -> int:
        """After exit 75 over a bus limit: how many of the lines sent, from the first, were
        stored (the server's ``N message(s) stored, M refused`` line); else 0."""
        found = _REFUSAL_LINE.search(self.stderr)
        return int(found[1]) if found and self.exit_code == ExitCode.TEMPFAIL else 0

    @property
    def permanent(self) -> bool:
        """True when sending the same lines again would fail the same way (64, 65, 77)."""
        return self.exit_code in PERMANENT_EXIT_CODES


class BusClient:
    """Connects to the bus named by ``settings`` with its key and host-key check.

    Construction reads the key file so a wrong path or an encrypted key is a
    :class:`ConfigError` (exit 78) at start, not a refused login later.
    """

    def __init__(self, settings: HooksSettings) -> None:
        self.settings = settings
        self._client_keys: list[asyncssh.SSHKey] | None = None
        if settings.key is not None:
            try:
                self._client_keys = [asyncssh.read_private_key(settings.key)]
            except (OSError, asyncssh.KeyImportError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(
                    f"key file {settings.key} cannot be used: {reason} (drainbus needs a "
                    "private key without a passphrase, or no key setting to use ssh-agent)"
                ) from None

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[BusSession]:
        """An authenticated connection to the bus; closed on exit.

        Raises :class:`BusUnreachable` when it cannot be opened or is lost while in use.
        """
        settings = self.settings
        known_hosts, known_hosts_problem = self._known_hosts()
        try:
            conn = await asyncssh.connect(
                settings.host,
                settings.port,
                username=settings.user,
                client_keys=self._client_keys if self._client_keys is not None else (),
                known_hosts=known_hosts,
                config=None,
                preferred_auth="publickey",
                connect_timeout=settings.connect_timeout or None,
                keepalive_interval=15,
                keepalive_count_max=3,
            )
        except asyncssh.HostKeyNotVerifiable:
            problem = known_hosts_problem or f"its host key is not in {settings.known_hosts}"
            raise self._unreachable(None, f"{problem}; {self._host_key_hint()}") from None
        except (OSError, asyncssh.Error) as exc:
            raise self._unreachable(exc) from None
        try:
            async with conn:
                yield BusSession(self, conn)
        except (asyncssh.Error, ConnectionError) as exc:
            raise self._unreachable(exc) from None

    def _known_hosts(self) -> tuple[asyncssh.SSHKnownHosts | None, str | None]:
        """The trusted host keys (None: trust any), and why there are none, if so.

        A missing or unreadable file trusts no key rather than failing here, so that a bus
        that is down is reported as down, not as a known_hosts problem.
        """
        path = self.settings.known_hosts
        if path is None:
            return None, None
        try:
            path = path.expanduser()
            return asyncssh.read_known_hosts(str(path)), None
        except RuntimeError:  # '~' with no home directory
            problem = f"known_hosts file {path} cannot be found: there is no home directory"
        except FileNotFoundError:
            problem = f"known_hosts file {path} does not exist"
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problem = f"known_hosts file {path} cannot be read: {reason}"
        return asyncssh.import_known_hosts(""), problem

    def _host_key_hint(self) -> str:
        settings = self.settings
        target = settings.known_hosts or "~/.ssh/known_hosts"
        return (
            f"add the bus's host key (ssh-keyscan -p {settings.port} {settings.host} "
            f'>> {target}), or set hooks.known_hosts = "none" (insecure)'
        )

    def _unreachable(self, exc: BaseException | None, reason: str | None = None) -> BusUnreachable:
        settings = self.settings
        if reason is None:
            reason = self._describe(exc)
        return BusUnreachable(settings.host, settings.port, reason)

    def _describe(self, exc: BaseException | None) -> str:
        settings = self.settings
        if isinstance(exc, asyncssh.PermissionDenied):
            which = f"key {settings.key}" if settings.key else "no offered key"
            return f"{which} is not accepted (register it on the bus: drainbus keys add NAME FILE)"
        if isinstance(exc, TimeoutError):
            return f"no answer within {settings.connect_timeout:g} s"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused"
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
        if isinstance(exc, asyncssh.Error) and exc.reason:
            return f"{exc.reason} (SSH)"
        return str(exc) or type(exc).__name__


class BusSession:
    """One connection to the bus; each publish runs one ``pub`` session on it."""

    def __init__(self, client: BusClient, conn: asyncssh.SSHClientConnection) -> None:
        self._client = client
        self._conn = conn

    async def publish(
        self,
        topic: str,
        lines: Sequence[str],
        *,
        stderr: BinaryIO | None = None,
        stdout: BinaryIO | None = None,
        wait: float | None = None,
        json_receipts: bool = False,
    ) -> PublishResult:
        """Publish each of ``lines`` as one message; return how the server's ``pub`` ended.

        The server's stderr is kept in the result and also copied to ``stderr`` if given.
        ``wait``: seconds to wait for the purge receipts (``pub --wait``), which the server
        writes to its stdout, copied to ``stdout`` if given.
        Raises :class:`UsageError` for a line containing a newline (it would become two
        messages) and :class:`BusUnreachable` if the connection fails.
        """
        for number, line in enumerate(lines, start=1):
            if "\n" in line or "\r" in line:
                raise UsageError(
                    f"message {number} contains a line break; give one line per message",
                    topic=topic,
                )
        data = "".join(f"{line}\n" for line in lines).encode()
        return await self._run(
            topic, data, stdout=stdout, stderr=stderr, wait=wait, json_receipts=json_receipts
        )

    async def publish_from(
        self,
        topic: str,
        fd: int | None,
        *,
        stdout: BinaryIO,
        stderr: BinaryIO,
        wait: float | None = None,
        json_receipts: bool = False,
    ) -> PublishResult:
        """Stream everything readable from file descriptor ``fd`` (stdin; None when closed)
        to ``pub TOPIC`` as it comes, so ``tail -f log | drainbus pub topic`` works as with
        ssh. The server's output is copied to ``stdout`` and ``stderr``. ``wait`` and
        ``json_receipts``: ``pub --wait=SECONDS [--json]``. Raises :class:`BusUnreachable`."""
        source = b"" if fd is None else fd
        return await self._run(
            topic, source, stdout=stdout, stderr=stderr, wait=wait, json_receipts=json_receipts
        )

    async def _run(
        self,
        topic: str,
        source: bytes | int,
        *,
        stdout: BinaryIO | None,
        stderr: BinaryIO | None,
        wait: float | None = None,
        json_receipts: bool = False,
    ) -> PublishResult:
        # The server splits its command line like a shell: quoted, the topic stays one
        # argument, so a bad one is refused by name (64) rather than as extra arguments.
        command = f"pub {shlex.quote(topic)}"
        if wait is not None:
            command += f" --wait={wait:g}s" + (" --json" if json_receipts else "")
        process = await self._conn.create_process(command, encoding=None)
        kept = bytearray()
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(_feed, process.stdin, source)
                async with anyio.create_task_group() as outputs:
                    outputs.start_soon(_copy, process.stdout, stdout, None)
                    outputs.start_soon(_copy, process.stderr, stderr, kept)
                # The server closed its output: it has ended and reads no more input.
                task_group.cancel_scope.cancel()
            await process.wait_closed()
        except* (asyncssh.Error, ConnectionResetError) as group:
            raise self._client._unreachable(group.exceptions[0]) from None
        finally:
            process.close()
        status = process.exit_status
        if status is None or status < 0:
            raise self._client._unreachable(None, "the session ended without an exit status")
        return PublishResult(status, kept.decode(errors="replace"))


async def _feed(writer: asyncssh.SSHWriter[bytes], source: bytes | int) -> None:
    """Send ``source`` (bytes, or everything read from a file descriptor) then EOF."""
    try:
        if isinstance(source, bytes):
            writer.write(source)
            await writer.drain()
        else:
            async for chunk in _read_fd(source):
                writer.write(chunk)
                await writer.drain()
        writer.write_eof()
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass  # the server stopped reading; its exit status says why


async def _read_fd(fd: int) -> AsyncIterator[bytes]:
    """Chunks from ``fd`` until EOF, waiting on the event loop for pipes, ttys and sockets."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # stdin closed (<&-): nothing to send
        return
    pollable = not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
    while True:
        if pollable:
            try:
                await anyio.wait_readable(fd)
            except PermissionError:  # a device epoll refuses (/dev/null): it never blocks
                pollable = False
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:  # someone else made the fd non-blocking and it is empty
            continue
        if not chunk:
            return
        yield chunk


async def _copy(
    reader: asyncssh.SSHReader[bytes], target: BinaryIO | None, kept: bytearray | None
) -> None:
    while chunk := await reader.read(_CHUNK):
        if target is not None:
            target.write(chunk)
            target.flush()
        if kept is not None and len(kept) < _STDERR_KEPT:
            kept.extend(chunk[: _STDERR_KEPT - len(kept)])
