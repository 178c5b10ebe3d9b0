"""``drainbus serve --workers N``: N worker processes serving one SSH port, one supervisor.

Each worker is an ordinary bus node (:func:`drainbus.node.open_node`) in a process of its
own, started as ``python -m drainbus … serve --worker K``; all of them listen on the same
port with SO_REUSEPORT and the kernel spreads new connections across them. What there must
be only one of stays with the supervisor:

- the port: before any worker starts it is bound (never listened on, so it receives no
  connection) with SO_REUSEPORT. That turns port 0 into one real port for every worker,
  fails at once (exit 71) when the port is taken, and keeps the port while a worker restarts;
- the embedded Redis-compatible server (when no ``redis_url`` is set), whose URL the workers
  get; and the host key, created here so that two workers never race to create it;
- systemd's notify socket: READY=1 once every worker serves. Workers never see NOTIFY_SOCKET.

Worker K differs from a lone ``serve`` in three ways: only worker 0 runs the drain (nginx
indexes and Cloudflare batches exist once), it serves metrics on the configured port + K, and
its log lines carry ``worker=K``. It reports once on a socketpair (``--ready-fd``):
``{"ready": true}`` when it serves, or ``{"exit_code": N, "message": "…"}`` when start-up
fails. It dies with the supervisor however the supervisor dies (PR_SET_PDEATHSIG).

Restarts. A worker that exits while the service runs is restarted: at once if it had run
for ``_STABLE_SECONDS``, else after 1, 2, 4, 8 and 16 s; after ``_MAX_QUICK_FAILURES`` quick
failures in a row the supervisor gives up and exits with that worker's code. A worker that
cannot start for a permanent reason (bad config or key file, port: any error outside the
retryable BackendError branch), and any worker failing before the service was first ready,
stop the supervisor at once with that worker's message and exit code, as ``serve --workers
1`` would have stopped.

Signals. SIGTERM or SIGINT: SIGTERM to every worker, each ending its sessions as a lone
``serve`` does (SIGKILL after ``2 * shutdown_grace + 5`` seconds); then the embedded server
stops and the supervisor exits 0. SIGHUP goes on to the workers: they re-read the users;
so does SIGUSR1: each logs its state. SIGUSR2 and SIGPIPE are ignored (:mod:`drainbus.signals`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from drainbus.backoff import Backoff
from drainbus.bus.embedded import EmbeddedRedis
from drainbus.config import Settings, parse_listen
from drainbus.errors import (
    BackendUnavailable,
    ConfigError,
    DataError,
    DrainbusError,
    ExitCode,
    LimitExceeded,
    PermissionDenied,
    StartupError,
    UsageError,
)
from drainbus.identity import load_or_create_host_key
from drainbus.lifeline import die_with_parent
from drainbus.signals import ignore_stray_signals

__all__ = ["WorkerLink", "supervise"]

log = structlog.get_logger(__name__)

_STABLE_SECONDS = 10.0  # a worker that ran this long before dying is restarted at once
_MAX_QUICK_FAILURES = 5


async def supervise(
    settings: Settings, command: Sequence[str], *, notify: Callable[[str], None]
) -> None:
    """Run ``settings.server.worker_count`` workers until SIGINT or SIGTERM.

    ``command`` starts one worker once ``--worker K --ready-fd FD`` is appended: the same
    ``drainbus … serve`` with the same log options and config file. ``notify`` hands a state
    line to systemd. Raises StartupError (port taken, embedded server), ConfigError (host
    key), or a worker's own error, same message and exit code, when a worker cannot start.
    """
    ignore_stray_signals()
    with (
        anyio.open_signal_receiver(
            signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1
        ) as signals,
        ExitStack() as resources,
    ):
        port = resources.enter_context(_reserve_port(settings.server.listen))
        load_or_create_host_key(settings.server.host_keys_dir)
        redis_url = settings.redis_url
        if not redis_url:
            redis_url = resources.enter_context(EmbeddedRedis(settings.data_dir)).url
        supervisor = _Supervisor(settings, command, port, redis_url, notify)
        async with anyio.create_task_group() as task_group:
            for index in range(settings.server.worker_count):
                task_group.start_soon(supervisor.keep_running, index)
            async for signum in signals:
                if signum in (signal.SIGHUP, signal.SIGUSR1):  # reload; dump their state
                    log.info("forwarding", signal=signal.Signals(signum).name)
                    supervisor.forward(signal.Signals(signum))
                    continue
                log.info("shutting_down", signal=signal.Signals(signum).name)
                notify("STOPPING=1")
                supervisor.stop()
                break
    log.info("stopped")


class WorkerLink:
    """A worker's end of its supervisor's socketpair. It reports once: ready, or failed."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self._sock: socket.socket | None = socket.socket(fileno=fd)

    def ready(self) -> None:
        """Tell the supervisor that this worker serves."""
        self._send({"ready": True})

    def failed(self, exc: DrainbusError) -> None:
        """Tell the supervisor why start-up failed; a no-op once ``ready`` was sent."""
        self._send({"exit_code": int(exc.exit_code), "message": exc.message})

    def _send(self, report: dict[str, Any]) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with sock, contextlib.suppress(OSError):  # a dead supervisor takes us down anyway
            sock.send(json.dumps(report).encode())


@dataclass(frozen=True)
class _Ended:
    """How one run of a worker ended."""

    pid: int
    returncode: int
    report: dict[str, Any]  # {} when the worker died before reporting
    uptime: float

    @property
    def was_ready(self) -> bool:
        return self.report.get("ready") is True

    @property
    def retryable(self) -> bool:
        """A crash, or Redis unreachable: not a config or bind error that will recur."""
        return bool(self.report.get("exit_code", ExitCode.UNAVAILABLE) == ExitCode.UNAVAILABLE)

    @property
    def status(self) -> dict[str, int | str]:
        """``exit_code=N`` or ``signal=NAME``, for log lines."""
        if self.returncode >= 0:
            return {"exit_code": self.returncode}
        try:
            return {"signal": signal.Signals(-self.returncode).name}
        except ValueError:
            return {"signal": -self.returncode}

    def error(self, index: int) -> DrainbusError:
        """The error the supervisor stops with because this worker could not start."""
        if "message" in self.report:
            return _error_for(
                self.report.get("exit_code"), f"worker {index}: {self.report['message']}"
            )
        shown = ", ".join(f"{k} {v}" for k, v in self.status.items())
        return _error_for(
            self.returncode, f"worker {index} exited ({shown}) before it served; see its log above"
        )

    def gave_up(self, index: int, failures: int) -> DrainbusError:
        shown = ", ".join(f"{k} {v}" for k, v in self.status.items())
        return _error_for(
            self.report.get("exit_code", self.returncode),
            f"worker {index} failed {failures} times in a row within {_STABLE_SECONDS:.0f} s "
            f"of starting (last: {shown}); giving up, see its log above",
        )


def _error_for(code: object, message: str) -> DrainbusError:
    """An error of the class that exits with ``code`` (a crash or a signal: 70)."""
    kinds = (UsageError, DataError, BackendUnavailable, StartupError, LimitExceeded,
             PermissionDenied, ConfigError)  # fmt: skip
    kind = next((k for k in kinds if k.exit_code == code), DrainbusError)
    return kind(message)


class _Supervisor:
    """Keeps one process running per worker index; stops them all on request."""

    def __init__(
        self,
        settings: Settings,
        command: Sequence[str],
        port: int,
        redis_url: str,
        notify: Callable[[str], None],
    ) -> None:
        self._settings = settings
        self._command = list(command)
        self._port = port
        self._count = settings.server.worker_count
        self._notify = notify
        # What the supervisor resolved (flags, port 0, the embedded server) reaches the
        # workers through the environment, which beats the config file they read too.
        host = settings.server.listen.rpartition(":")[0]
        self._env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self._env |= {
            "DRAINBUS_SERVER__LISTEN": f"{host}:{port}",
            "DRAINBUS_REDIS_URL": redis_url,
            "DRAINBUS_DATA_DIR": str(settings.data_dir),
        }
        if settings.http.listen:  # worker 0 serves it (drainbus.http.server says why)
            self._env["DRAINBUS_HTTP__LISTEN"] = settings.http.listen
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._waits: dict[int, anyio.CancelScope] = {}
        self._ready: set[int] = set()
        self._serving = False
        self._stopping = anyio.Event()
        # A worker's own shutdown takes up to two shutdown_grace periods (sessions, then
        # connections); one still running after this is killed.
        self._stop_timeout = 2 * settings.server.shutdown_grace + 5.0

    async def keep_running(self, index: int) -> None:
        """Run worker ``index`` until ``stop``, restarting it whenever it exits.

        Raises the worker's error when it cannot start and restarting would not help.
        """
        quick_failures = 0
        restarts = Backoff("worker_restarting", base=1.0, cap=30.0)
        while True:
            ended = await self._run(index)
            if self._stopping.is_set():
                return
            log.warning("worker_exited", worker=index, pid=ended.pid,
                        uptime=round(ended.uptime, 3), **ended.status)  # fmt: skip
            if not ended.was_ready and not (self._serving and ended.retryable):
                raise ended.error(index)
            quick_failures = quick_failures + 1 if ended.uptime < _STABLE_SECONDS else 0
            if quick_failures > _MAX_QUICK_FAILURES:
                raise ended.gave_up(index, quick_failures)
            # The shared back-off (with jitter, so workers that died together do not all
            # restart at once): 0.5-1 s, 1-2 s, 2-4 s... for quick failures in a row.
            restarts.failures = quick_failures
            delay = restarts.delay() if quick_failures else 0.0
            log.warning("worker_restarting", worker=index, delay=round(delay, 3),
                        attempts_left=_MAX_QUICK_FAILURES - quick_failures)  # fmt: skip
            with anyio.move_on_after(delay):
                await self._stopping.wait()
            if self._stopping.is_set():
                return

    def forward(self, signum: signal.Signals) -> None:
        """Send ``signum`` to every worker that serves (and so handles it)."""
        for index in self._ready:
            self._processes[index].send_signal(signum)

    def stop(self) -> None:
        """Have every worker stopped (see ``_end``); ``keep_running`` then returns."""
        self._stopping.set()
        for scope in self._waits.values():
            scope.cancel()

    async def _run(self, index: int) -> _Ended:
        """Start worker ``index`` and return once it has exited (or been stopped)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            with theirs:
                process = _spawn(
                    [*self._command, "--worker", str(index), "--ready-fd", str(theirs.fileno())],
                    self._worker_env(index),
                    theirs.fileno(),
                )
            started = anyio.current_time()
            pidfd = os.pidfd_open(process.pid)
            self._processes[index] = process
            log.info("worker_started", worker=index, pid=process.pid)
            report: dict[str, Any] = {}
            try:
                with anyio.CancelScope() as self._waits[index]:
                    report = await _read_report(ours)
                    if report.get("ready") is True:
                        self._worker_ready(index)
                    await anyio.wait_readable(pidfd)
            finally:
                del self._waits[index], self._processes[index]
                self._ready.discard(index)
                with anyio.CancelScope(shield=True):
                    await self._end(index, process, pidfd)
                os.close(pidfd)
        return _Ended(process.pid, process.returncode, report, anyio.current_time() - started)

    def _worker_env(self, index: int) -> dict[str, str]:
        env = dict(self._env)
        listen = self._settings.metrics_listen
        if listen is None:
            env.pop("DRAINBUS_METRICS_LISTEN", None)
        else:
            port = parse_listen(listen)[1]
            env["DRAINBUS_METRICS_LISTEN"] = f"{listen.rpartition(':')[0]}:{port and port + index}"
        return env

    def _worker_ready(self, index: int) -> None:
        self._ready.add(index)
        if not self._serving and len(self._ready) == self._count:
            self._serving = True
            self._notify("READY=1")
            log.info("serving", port=self._port, pid=os.getpid(), workers=self._count,
                     drain=self._settings.drain.enabled)  # fmt: skip

    async def _end(self, index: int, process: subprocess.Popen[bytes], pidfd: int) -> None:
        """Make sure the worker has exited: SIGTERM, SIGKILL after the stop timeout; reap."""
        if process.poll() is None:
            process.terminate()
            with anyio.move_on_after(self._stop_timeout):
                await anyio.wait_readable(pidfd)
            if process.poll() is None:
                log.warning("worker_killed", worker=index, pid=process.pid,
                            after=self._stop_timeout)  # fmt: skip
                process.kill()
                await anyio.wait_readable(pidfd)
        process.wait()


async def _read_report(sock: socket.socket) -> dict[str, Any]:
    """The worker's one report; ``{}`` when it closed its end without one (it died)."""
    await anyio.wait_readable(sock)
    try:
        report = json.loads(sock.recv(65536) or b"{}")
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _spawn(argv: list[str], env: dict[str, str], fd: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        pass_fds=(fd,),
        # Called from the main thread (anyio.run), where preexec_fn is safe, and needed:
        # PDEATHSIG must be set in the child itself, and fires when this thread ends.
        preexec_fn=die_with_parent(),  # noqa: PLW1509
    )


@contextmanager
def _reserve_port(listen: str) -> Iterator[int]:
    """Bind, never listen, SO_REUSEPORT sockets on ``listen``; yield the port they hold.

    Raises StartupError, worded as the front door's, when the port cannot be bound.
    """
    host, port = parse_listen(listen)
    with ExitStack() as stack:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)  # fmt: skip
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = stack.enter_context(socket.socket(family, kind, proto))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # as asyncio sets its listening sockets
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                port = sock.getsockname()[1]  # port 0 resolves once, for every address
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        yield port
