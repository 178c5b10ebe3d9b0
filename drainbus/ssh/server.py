"""The SSH front door: authentication, limits, and dispatch of each session to a command.

Public-key authentication only; the user is whoever's key file holds the presented key,
whatever login name the client sent. Everything an interactive SSH server offers beyond
running one command is refused: PTYs, shells (a bare ``ssh host`` prints help), port and
agent forwarding, X11, SFTP and scp.
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType

import anyio
import asyncssh
import structlog

from drainbus.acl import Access
from drainbus.bus import Bus
from drainbus.config import Settings
from drainbus.errors import ExitCode, StartupError
from drainbus.identity import Identity, UserKeys
from drainbus.metrics import SESSIONS
from drainbus.ssh.commands import LineCheck, SessionContext, command_label, run_command

__all__ = ["FrontDoor"]

log = structlog.get_logger(__name__)

# AES-GCM first, and no chacha20-poly1305: asyncssh's chacha20 costs about six times more
# CPU per packet than AES-GCM (which uses AES-NI through OpenSSL). AES-CTR stays for clients
# without AES-GCM: Dropbear 2022.83 offers only chacha20-poly1305 and AES-CTR.
_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

# Key exchange: asyncssh's default list with curve25519-sha256 moved to the front ("^" is
# asyncssh's OpenSSH-style "put these first" form, so the list follows asyncssh). Dropbear's
# dbclient sends its key-exchange packet before negotiation ends, guessing its first choice
# (RFC 4253 section 7, first_kex_packet_follows). Dropbear counts the guess right only when
# both sides list the same algorithm first (and the same host key algorithm first: ours is
# ssh-ed25519, as is Dropbear's), while asyncssh counts it right whenever the client's first
# choice is one it supports. When the two disagree, asyncssh runs the guessed packet, Dropbear
# sends the real one, and asyncssh drops the connection: dbclient 2022.83 (first choice
# curve25519-sha256) against asyncssh's default list (mlkem768x25519-sha256 first) fails so.
# Leading with curve25519-sha256 makes the guess right for both. Dropbear 2025.87 and later
# guess sntrup761x25519-sha512, which asyncssh offers only when liboqs is installed: without
# it both sides count that guess wrong and agree again (tests/test_clients.py is the check).
# The post-quantum exchanges stay in the list: the negotiated algorithm is the client's first
# choice that the server offers, so an OpenSSH that prefers mlkem768x25519-sha256 still gets it.
_KEX_ALGS = "^curve25519-sha256"


class _Connection(asyncssh.SSHServer):
    """One client connection: authenticates it and counts it against the limit."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._candidate: Identity | None = None
        self.identity: Identity | None = None
        self.peer = "?"
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._door._connections.add(conn)
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self._door.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._door.connections -= 1
        if self._conn is not None:
            self._door._connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        limit = self._door.settings.server.max_connections
        if self._door.connections > limit and self._conn is not None:
            log.warning("connection_refused", peer=self.peer, reason="max_connections", limit=limit)
            self._conn.disconnect(
                asyncssh.DISC_TOO_MANY_CONNECTIONS,
                f"drainbus: too many connections (limit {limit}); try again later",
            )
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Called for each key the client offers, and again with the signature for the one
        # it signs with; authentication succeeds right after that last call, so the last
        # identity remembered here is the one that signed.
        identity = self._door.users.lookup(key)
        if identity is None:
            log.info("auth_key_unknown", peer=self.peer, fingerprint=key.get_fingerprint())
            return False
        self._candidate = identity
        return True

    def auth_completed(self) -> None:
        self.identity = self._candidate


class FrontDoor:
    """The SSH listener of one bus node. An async context manager; ``port`` once entered.

    ``reuse_port``: bind with SO_REUSEPORT, so other processes of the same user can listen on
    the same port and the kernel balances new connections across them.
    """

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        users: UserKeys,
        host_key: asyncssh.SSHKey,
        *,
        line_checks: dict[str, LineCheck] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.users = users
        self.access = Access(settings.acl)
        self.connections = 0
        self.port = 0
        self._host_key = host_key
        self._line_checks = line_checks or {}
        self._reuse_port = reuse_port
        self._sessions_by_user: dict[str, int] = {}
        self._processes: set[asyncssh.SSHServerProcess[bytes]] = set()
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._server: asyncssh.SSHAcceptor | None = None
        self._idle = anyio.Event()
        self._idle.set()

    async def __aenter__(self) -> FrontDoor:
        host, port = self.settings.server.listen_address
        server = self.settings.server
        try:
            self._server = await asyncssh.create_server(
                lambda: _Connection(self),
                host,
                port,
                server_host_keys=[self._host_key],
                process_factory=self._handle,
                encoding=None,
                allow_pty=False,
                # No pty, so no line editing: without this every write passes the editor.
                line_editor=False,
                agent_forwarding=False,
                x11_forwarding=False,
                sftp_factory=None,
                allow_scp=False,
                login_timeout=server.login_timeout,
                keepalive_interval=server.keepalive_interval,
                keepalive_count_max=server.keepalive_count_max,
                reuse_address=True,
                # Several worker processes listening on one port; the kernel spreads connections.
                reuse_port=self._reuse_port,
                encryption_algs=_CIPHERS,
                kex_algs=_KEX_ALGS,
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {server.listen}: {exc.strerror or exc}") from None
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info(
            "ssh_listening", listen=f"{host}:{self.port}", host_key=self._host_key.get_fingerprint()
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting, give sessions ``shutdown_grace`` seconds to end, then close them."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # Stop listening only: since Python 3.12.1 wait_closed() also waits for every open
        # connection, so it comes last, after the sessions and connections are ended.
        server.close()
        for process in tuple(self._processes):
            if process.command and process.command.split()[0] == "sub":
                process.stderr.write(b"drainbus: server shutting down\n")
                process.exit(int(ExitCode.TEMPFAIL))
        with anyio.move_on_after(self.settings.server.shutdown_grace):
            await self._idle.wait()
        for process in tuple(self._processes):
            process.stderr.write(b"drainbus: server shutting down\n")
            process.exit(int(ExitCode.TEMPFAIL))
        for conn in tuple(self._connections):
            conn.close()
        with anyio.move_on_after(self.settings.server.shutdown_grace):
            await server.wait_closed()

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        conn = process.get_extra_info("connection")
        owner = conn.get_owner() if conn else None
        identity = owner.identity if isinstance(owner, _Connection) else None
        if identity is None:  # cannot happen after successful auth; refuse rather than guess
            process.exit(int(ExitCode.NOPERM))
            return
        session = uuid.uuid4().hex[:12]
        structlog.contextvars.bind_contextvars(
            session=session, user=identity.user, fingerprint=identity.fingerprint
        )
        ctx = SessionContext(
            identity=identity,
            process=process,
            settings=self.settings,
            bus=self.bus,
            access=self.access,
            line_checks=self._line_checks,
        )
        started = time.monotonic()
        code = ExitCode.SOFTWARE
        self._processes.add(process)
        self._idle = anyio.Event() if len(self._processes) == 1 else self._idle
        count = self._sessions_by_user.get(identity.user, 0) + 1
        self._sessions_by_user[identity.user] = count
        try:
            limit = self.settings.server.max_sessions_per_user
            if count > limit:
                ctx.stderr(
                    f"drainbus: too many sessions for user '{identity.user}' "
                    f"(limit {limit}); try again later"
                )
                code = ExitCode.TEMPFAIL
            else:
                code = ExitCode(await self._run_until_closed(ctx))
        except* (
            BrokenPipeError,
            ConnectionError,
            asyncssh.ChannelOpenError,
            asyncssh.DisconnectError,
        ):
            code = ExitCode.OK  # the client went away mid-write: an ordinary end for sub
        except* Exception:
            log.exception("session_failed")
            ctx.stderr("drainbus: internal error; the server log has details")
            code = ExitCode.SOFTWARE
        finally:
            self._sessions_by_user[identity.user] -= 1
            if not self._sessions_by_user[identity.user]:
                del self._sessions_by_user[identity.user]
            self._processes.discard(process)
            if not self._processes:
                self._idle.set()
            log.info(
                "session_ended",
                command=(process.command or "").split(" ", 1)[0] or "(none)",
                topic=ctx.topic,
                bytes_in=ctx.bytes_in,
                bytes_out=ctx.bytes_out,
                exit_code=int(code),
                seconds=round(time.monotonic() - started, 3),
                peer=process.get_extra_info("peername", ("?",))[0],
            )
            if not process.is_closing():
                process.exit(int(code))
            SESSIONS.labels(command_label(process.command), str(int(code))).inc()

    async def _run_until_closed(self, ctx: SessionContext) -> int:
        """Run the command, abandoning it if the client goes away first."""
        result = int(ExitCode.OK)
        async with anyio.create_task_group() as tg:

            async def watch_channel() -> None:
                await ctx.process.wait_closed()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_channel)
            result = await run_command(ctx, ctx.process.command)
            tg.cancel_scope.cancel()
        return result
