"""The SSH front door: authentication, limits, and dispatch of each session to a command.

Public-key authentication only; the user is whoever's key file holds the presented key,
whatever login name the client sent. Everything an interactive SSH server offers beyond
running one command is refused: PTYs, shells (a bare ``ssh host`` prints help), port and
agent forwarding, X11, SFTP and scp.

asyncio on purpose: asyncssh is asyncio-only and calls in here from its protocol callbacks,
and each connection's idle (or refusal) clock is a ``loop.call_later`` handle, restarted at
every session's end; anyio has no timer that cheap. Tasks and events are anyio's.
"""

from __future__ import annotations

import asyncio
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
from drainbus.identity import Identity, UserKeys, weak_key_reason
from drainbus.metrics import SESSIONS
from drainbus.ssh.admission import Admission
from drainbus.ssh.algorithms import CIPHERS, KEX_ALGS, MAC_ALGS, SIG_ALG_SET, SIG_ALGS
from drainbus.ssh.commands import LineCheck, SessionContext, command_label, run_command

__all__ = ["FrontDoor"]

log = structlog.get_logger(__name__)


class _Connection(asyncssh.SSHServer):
    """One client connection: authenticates it and counts it against the limits.

    A connection is first *starting* (counted against the pre-authentication budget of the
    door and of its source address), then, once logged in, *active* (counted against
    ``max_connections`` and its user's ``max_connections_per_user``), and *closing* once a
    limit refused it, it idled out or its key was removed (then it counts against nothing).

    A login over a connection limit is *refused*: it counts against nothing, and a session
    it opens within ``login_timeout`` gets the reason on stderr and exit 75, like a session
    over ``max_sessions_per_user``; then (or after that time) it is disconnected. Refusing in
    a session, not by disconnecting at once, makes every client say why and exit non-zero:
    Dropbear's dbclient exits 0 when the server disconnects it.
    """

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._candidate: tuple[Identity, asyncssh.SSHKey] | None = None
        self.identity: Identity | None = None
        self.key: asyncssh.SSHKey | None = None
        self.peer = "?"
        self.source = "?"
        self.state = "new"
        self.conn: asyncssh.SSHServerConnection | None = None
        self.sessions = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.refusal: str | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self._door._connections.add(conn)
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.source = str(peer[0])
        self._door._start(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_idle_timer()
        self._door._forget(self)
        if self.conn is not None:
            self._door._connections.discard(self.conn)

    def refuse(self, reason: str, message: str, limit: int, **fields: object) -> None:
        """Close this connection with ``message`` for the client, logging why."""
        log.warning("connection_refused", peer=self.peer, reason=reason, limit=limit, **fields)
        self.close(asyncssh.DISC_TOO_MANY_CONNECTIONS, message)

    def refuse_sessions(self, reason: str, message: str, limit: int, **fields: object) -> None:
        """Refuse this logged-in connection: its sessions exit 75 with ``message``, and it is
        closed after ``login_timeout`` (see the class docstring)."""
        log.warning("connection_refused", peer=self.peer, reason=reason, limit=limit, **fields)
        self._door._forget(self)
        self.state, self.refusal = "refused", message
        self.stop_idle_timer()
        self._idle_timer = asyncio.get_running_loop().call_later(
            self._door.settings.server.login_timeout,
            self.close,
            asyncssh.DISC_TOO_MANY_CONNECTIONS,
            message,
        )

    def close(self, code: int, message: str) -> None:
        """Disconnect with ``message`` (shown by OpenSSH) and stop counting this connection."""
        self._door._forget(self)
        self.state = "closing"
        if self.conn is not None:
            self.conn.disconnect(code, f"drainbus: {message}")

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
            self._door._admission.failures.add(self.source, key.get_fingerprint())
            return False
        # The key line's from= and expiry-time= (drainbus.key_options), as OpenSSH enforces;
        # a weak key is refused when its file is loaded, and here again whatever loaded it.
        refusal = weak_key_reason(key) or self._door.users.refusal(key, self.source)
        if refusal is not None:
            log.warning(
                "auth_refused", source=self.source, user=identity.user,
                fingerprint=identity.fingerprint, reason=refusal,
            )  # fmt: skip
            return False
        # asyncssh verifies the signature with this very key object next: restrict it to the
        # algorithms offered, so an RSA key cannot sign with ssh-rsa (SHA-1).
        key.all_sig_algorithms = key.all_sig_algorithms & SIG_ALG_SET
        self._candidate = (identity, key)
        return True

    def auth_completed(self) -> None:
        if self._candidate is not None:
            self.identity, self.key = self._candidate
        self._door._log_in(self)

    def session_started(self) -> None:
        """A session opened on this connection: it is not idle."""
        self.sessions += 1
        self.stop_idle_timer()

    def session_ended(self) -> None:
        """A session ended: with none left, the idle clock starts."""
        self.sessions -= 1
        if not self.sessions and self.state == "active":
            self.start_idle_timer()

    def start_idle_timer(self) -> None:
        """Close this connection after ``idle_timeout`` unless a session starts first."""
        timeout = self._door.settings.server.idle_timeout
        if timeout:
            self.stop_idle_timer()
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._idle)

    def stop_idle_timer(self) -> None:
        """Stop the idle clock (a session is running, or the connection is gone)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        timeout = self._door.settings.server.idle_timeout
        log.info("connection_idle_closed", peer=self.peer, seconds=timeout)
        self.close(
            asyncssh.DISC_BY_APPLICATION,
            f"connection closed after {timeout:g}s with no session (server.idle_timeout)",
        )


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
        # Logged-in connections; those still authenticating are the admission's.
        self.connections = 0
        self._admission = Admission(settings.server)
        self.port = 0
        self._host_key = host_key
        self._line_checks = line_checks or {}
        self._reuse_port = reuse_port
        self.sessions_by_user: dict[str, int] = {}
        self.connections_by_user: dict[str, set[_Connection]] = {}
        self._processes: set[asyncssh.SSHServerProcess[bytes]] = set()
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._server: asyncssh.SSHAcceptor | None = None
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def startups(self) -> int:
        """Connections still authenticating (counted against the start-up budget)."""
        return self._admission.starting

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
                encryption_algs=CIPHERS,
                kex_algs=KEX_ALGS,
                mac_algs=MAC_ALGS,
                signature_algs=SIG_ALGS,
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {server.listen}: {exc.strerror or exc}") from None
        self.users.add_listener(self._check_keys)
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
        self.users.remove_listener(self._check_keys)
        self._admission.failures.close()
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

    def _start(self, owner: _Connection) -> None:
        """Admit a new connection into the start-up budget, or refuse it."""
        if self._admission.admit(owner.peer, owner.source):
            owner.state = "starting"
            return
        owner.state = "closing"
        # Our version string goes out after connection_made returns: disconnect after it.
        assert owner.conn is not None
        asyncio.get_running_loop().call_soon(
            owner.conn.disconnect,
            asyncssh.DISC_TOO_MANY_CONNECTIONS,
            "drainbus: too many connections still logging in; try again later",
        )

    def _log_in(self, owner: _Connection) -> None:
        """Move a connection that authenticated from the start-up budget to the user limits."""
        self._forget(owner)
        server = self.settings.server
        identity = owner.identity
        if identity is None:  # cannot happen after successful auth; refuse rather than guess
            owner.close(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "not authenticated")
            return
        mine = self.connections_by_user.setdefault(identity.user, set())
        if self.connections >= server.max_connections:
            limit = server.max_connections
            owner.refuse_sessions(
                "max_connections", f"too many connections (limit {limit}); try again later", limit
            )
        elif len(mine) >= server.max_connections_per_user:
            limit = server.max_connections_per_user
            owner.refuse_sessions(
                "max_connections_per_user",
                f"too many connections for user '{identity.user}' (limit {limit}); "
                "close one (or share one with ControlMaster) and try again",
                limit,
                user=identity.user,
            )
        else:
            owner.state = "active"
            self.connections += 1
            mine.add(owner)
            owner.start_idle_timer()
        if not mine:
            del self.connections_by_user[identity.user]

    def _forget(self, owner: _Connection) -> None:
        """Stop counting ``owner`` against any limit (idempotent)."""
        if owner.state == "starting":
            self._admission.release(owner.source)
        elif owner.state == "active" and owner.identity is not None:
            self.connections -= 1
            mine = self.connections_by_user[owner.identity.user]
            mine.discard(owner)
            if not mine:
                del self.connections_by_user[owner.identity.user]
        owner.state = "closed"

    def _authorised(self, owner: _Connection) -> bool:
        """True while the key ``owner`` logged in with still belongs to the same user."""
        return owner.key is not None and self.users.lookup(owner.key) == owner.identity

    def _check_keys(self) -> None:
        """After the users folder is reloaded: close connections whose key was removed."""
        for owner in [c for users in self.connections_by_user.values() for c in users]:
            if not self._authorised(owner):
                assert owner.identity is not None
                log.warning(
                    "connection_revoked", peer=owner.peer, user=owner.identity.user,
                    fingerprint=owner.identity.fingerprint,
                )  # fmt: skip
                owner.close(
                    asyncssh.DISC_BY_APPLICATION,
                    f"the key of user '{owner.identity.user}' was removed; connection closed",
                )

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        conn = process.get_extra_info("connection")
        owner = conn.get_owner() if conn else None
        identity = owner.identity if isinstance(owner, _Connection) else None
        if isinstance(owner, _Connection) and owner.state == "refused":
            process.stderr.write(f"drainbus: {owner.refusal}\n".encode())
            process.exit(int(ExitCode.TEMPFAIL))
            return
        if not isinstance(owner, _Connection) or identity is None or owner.state != "active":
            # Not logged in, or closing (refused by a limit, idle, key removed): refuse.
            process.exit(int(ExitCode.NOPERM))
            return
        if not self._authorised(owner):
            # A reload closes such connections at once; this check does not depend on it.
            process.stderr.write(
                f"drainbus: the key of user '{identity.user}' is no longer accepted\n".encode()
            )
            process.exit(int(ExitCode.NOPERM))
            return
        owner.session_started()
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
        count = self.sessions_by_user.get(identity.user, 0) + 1
        self.sessions_by_user[identity.user] = count
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
            owner.session_ended()
            self.sessions_by_user[identity.user] -= 1
            if not self.sessions_by_user[identity.user]:
                del self.sessions_by_user[identity.user]
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
