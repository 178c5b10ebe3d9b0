"""The local command line: ``drainbus serve``, ``drainbus keys …``.

Every failure a person can cause or fix ends as one line on stderr and a sysexits code;
tracebacks are for bugs only.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import click
import structlog

from drainbus.click_common import config_option
from drainbus.click_common import fail as _fail
from drainbus.click_common import load_cli_settings as _settings
from drainbus.config import Settings
from drainbus.errors import ConfigError, DrainbusError, UsageError
from drainbus.hooks.commands import hook, pub
from drainbus.http.commands import http_listen_option, tokens
from drainbus.identity import UserKeys, user_key
from drainbus.log import configure_logging
from drainbus.signals import wait_for_stop
from drainbus.sysexits_click import SysexitsGroup
from drainbus.systemd import notify as notify_systemd

if TYPE_CHECKING:
    from drainbus.bus.connection import RedisClient
    from drainbus.drain.nginx import NginxCacheConfig
    from drainbus.supervisor import WorkerLink

__all__ = ["main"]

log = structlog.get_logger(__name__)


@click.group(cls=SysexitsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-json/--log-console",
    default=None,
    help="Log format; default: console on a terminal, JSON lines otherwise.",
)
@click.version_option(package_name="drainbus")
@click.pass_context
def cli(ctx: click.Context, config: str | None, log_level: str, log_json: bool | None) -> None:
    """drainbus: a cache-invalidation bus over SSH and Redis streams."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    configure_logging(log_level, json=log_json)


_metrics_option = click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (env DRAINBUS_METRICS_LISTEN); "
    "with serve --workers N, worker K serves on PORT+K (port 0: each picks a free port).",
)


@cli.command()
@config_option
@click.option("--listen", metavar="HOST:PORT", help="SSH address (default 0.0.0.0:2222).")
@click.option(
    "--redis-url",
    metavar="URL",
    help="Redis URL (env DRAINBUS_REDIS_URL); default: start an embedded server in the data dir.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where the embedded server keeps its files (default ./data).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    metavar="N",
    help="Processes sharing the SSH port (SO_REUSEPORT), each a node of the bus, under a "
    "supervisor that restarts any that dies; 0: one per CPU (the default); 1: one process, "
    "no supervisor (env DRAINBUS_SERVER__WORKERS).",
)
@_metrics_option
@http_listen_option
# Set by the supervisor on the processes it starts (see drainbus.supervisor).
@click.option("--worker", type=click.IntRange(min=0), hidden=True)
@click.option("--ready-fd", type=click.IntRange(min=0), hidden=True)
@click.pass_context
def serve(
    ctx: click.Context,
    config: str | None,
    listen: str | None,
    redis_url: str | None,
    data_dir: str | None,
    workers: int | None,
    metrics_listen: str | None,
    http_listen: str | None,
    worker: int | None,
    ready_fd: int | None,
) -> None:
    """Run the SSH bus in the foreground until SIGINT or SIGTERM (SIGHUP reloads users)."""
    settings = _settings(
        ctx,
        config,
        redis_url=redis_url,
        data_dir=data_dir,
        metrics_listen=metrics_listen,
        server={"listen": listen, "workers": workers},
        http={"listen": http_listen},
    )
    if worker is not None and ready_fd is not None:
        from drainbus.supervisor import WorkerLink

        structlog.contextvars.bind_contextvars(worker=worker)
        link = WorkerLink(worker, ready_fd)
        _run(lambda: _serve(settings, link))
    elif _worker_count(settings) == 1:
        _run(lambda: _serve(settings))
    else:
        from drainbus.supervisor import supervise

        command = _worker_command(ctx)
        _run(lambda: supervise(settings, command, notify=notify_systemd))


def _worker_count(settings: Settings) -> int:
    try:
        return settings.server.worker_count
    except ConfigError as exc:  # several workers asked for off Linux
        _fail(exc)


def _worker_command(ctx: click.Context) -> list[str]:
    """``drainbus … serve`` as this process was started: its log options and config file."""
    root = ctx.find_root().params
    command = [sys.executable, "-m", "drainbus", "--log-level", root["log_level"]]
    if root["log_json"] is not None:
        command.append("--log-json" if root["log_json"] else "--log-console")
    command.append("serve")
    if ctx.obj.get("config"):
        command += ["--config", ctx.obj["config"]]
    return command


@cli.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def check_config(ctx: click.Context, path: str | None) -> None:
    """Validate a config file (and the environment) without starting anything."""
    configure_logging("warning")  # the answer is one line; progress logs would bury it
    settings = _settings(ctx, path)
    try:
        users = UserKeys(settings.server.users_dir, settings.server.admins)
        users.load()
        for zone in settings.drain.cloudflare:
            zone.resolve_token()
        for number, cache in enumerate(settings.drain.nginx, start=1):
            _check_nginx_keys(cache, cache.name or f"nginx-{number}")
    except DrainbusError as exc:
        _fail(exc)
    drain = settings.drain
    targets = len(drain.nginx) + len(drain.http_purge) + len(drain.cloudflare)
    source = ctx.obj.get("config") or "(no file: defaults and environment)"
    redis = "external" if settings.redis_url else "embedded"
    drain_text = f"with {targets} target(s)" if drain.enabled else "off"
    click.echo(
        f"ok: {source}: listen {settings.server.listen}, redis {redis}, "
        f"{len(users.users)} user(s), {len(settings.acl)} acl rule(s), drain {drain_text}"
    )


def _check_nginx_keys(cache: NginxCacheConfig, name: str) -> None:
    """Raise ConfigError if the key template cannot read the keys nginx wrote in the cache.

    A folder that does not exist yet or cannot be read here is left to the drain's start.
    """
    from drainbus.drain.key_check import check_keys, sample_keys

    folder = cache.cache_path
    if folder.is_dir() and os.access(folder, os.R_OK | os.X_OK):
        check_keys(cache.key_template(), sample_keys(folder), cache=name)


def _event_loop_options() -> dict[str, Any]:
    """uvloop when it is installed (a dependency on Linux and macOS): its transports and
    callbacks cost about half of asyncio's, which is most of what a fan-out spends per
    subscriber outside encryption. ``DRAINBUS_EVENT_LOOP=asyncio`` keeps asyncio's own."""
    if os.environ.get("DRAINBUS_EVENT_LOOP", "uvloop") == "asyncio":
        return {}
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        anyio.run(main, backend_options=_event_loop_options())
    except* DrainbusError as group:
        # Task groups wrap what passes through them; the person at the terminal needs only
        # the first error drainbus raised on purpose.
        _fail(_first_leaf(group))
    except* KeyboardInterrupt:  # a second Ctrl-C during shutdown
        sys.exit(130)


def _first_leaf(group: BaseExceptionGroup[DrainbusError]) -> DrainbusError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _serve(settings: Settings, worker: WorkerLink | None = None) -> None:
    """One node in this process; ``worker``: it is one of a supervisor's workers."""
    # Imported here so `drainbus keys …` starts without loading the server stack.
    from drainbus.node import open_node
    from drainbus.state_dump import dump_node

    try:
        async with open_node(settings, worker=worker.index if worker else None) as node:

            def ready() -> None:
                # What start-up made (modules, settings, the nginx index) lives as long as the
                # process: frozen, the garbage collector stops walking it, which took 18 ms of
                # every full collection, a pause for every session.
                gc.freeze()
                log.info("serving", port=node.port, pid=os.getpid(), drain=node.drain is not None)
                if worker is None:
                    notify_systemd("READY=1")
                else:
                    worker.ready()

            await wait_for_stop(reload=node.users.reload, dump=lambda: dump_node(node), ready=ready)
    except* DrainbusError as group:
        if worker is not None:  # the supervisor ends with this worker's message and code
            worker.failed(_first_leaf(group))
        raise
    log.info("stopped")


@cli.command()
@config_option
@click.option("--redis-url", metavar="URL", help="The bus's Redis (env DRAINBUS_REDIS_URL).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Without --redis-url: the data dir of a `drainbus serve` on this machine.",
)
@_metrics_option
@click.pass_context
def drain(
    ctx: click.Context,
    config: str | None,
    redis_url: str | None,
    data_dir: str | None,
    metrics_listen: str | None,
) -> None:
    """Run the drain daemon alone (for web nodes without the SSH front door)."""
    settings = _settings(
        ctx, config, redis_url=redis_url, data_dir=data_dir, metrics_listen=metrics_listen
    )
    if not settings.drain.enabled:
        _fail(
            ConfigError(
                "no drain targets configured: add [[drain.nginx]], "
                "[[drain.http_purge]] or [drain.cloudflare] to the config"
            )
        )
    _run(lambda: _drain(settings))


async def _drain(settings: Settings) -> None:
    from drainbus.drain.build import open_drain
    from drainbus.metrics import NodeCollector, serve_metrics
    from drainbus.state_dump import dump_drain

    async with (
        _tool_redis(settings) as (redis, url),
        open_drain(settings, redis=redis, redis_url=url) as daemon,
        anyio.create_task_group() as task_group,
    ):
        collector = NodeCollector(settings.drain.node, drain=daemon)
        with serve_metrics(settings.metrics_listen, collector):
            task_group.start_soon(daemon.run)
            await daemon.ready.wait()  # groups made and status published: now it drains
            notify_systemd("READY=1")
            log.info(
                "draining",
                node=settings.drain.node,
                topic=settings.drain.topic,
                roles=[r.name for r in daemon.roles],
            )
            await wait_for_stop(dump=lambda: dump_drain(daemon))
            task_group.cancel_scope.cancel()
    log.info("stopped")


@asynccontextmanager
async def _tool_redis(settings: Settings) -> AsyncIterator[tuple[RedisClient, str]]:
    """The bus's Redis for commands that only use it: the URL, or a local serve's socket."""
    from redis.exceptions import RedisError

    from drainbus.bus.connection import backend_error, command_client

    url = settings.redis_url
    if not url:
        socket_path = (settings.data_dir / "redis.sock").resolve()
        if not socket_path.exists():
            raise UsageError(
                "no Redis to talk to: pass --redis-url (env DRAINBUS_REDIS_URL), or run this "
                f"beside a running `drainbus serve` using the same --data-dir ({socket_path} "
                "does not exist)"
            )
        url = f"unix://{socket_path}"
    redis = command_client(url)
    try:
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            raise backend_error(exc, "connecting") from exc
        yield redis, url
    finally:
        await redis.aclose()


# --- dlq -------------------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """Inspect and replay purges the drain gave up on (the dead-letter stream)."""


@dlq.command("ls")
@config_option
@click.option("--redis-url", metavar="URL")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
@click.pass_context
def dlq_ls(ctx: click.Context, config: str | None, redis_url: str | None, as_json: bool) -> None:
    """List dead letters: id, failed group, publisher, error, purge line."""
    settings = _settings(ctx, config, redis_url=redis_url)

    async def run() -> None:
        from drainbus.bus.streams import Keys
        from drainbus.drain.dead_letters import list_dead_letters

        async with _tool_redis(settings) as (redis, _):
            letters = await list_dead_letters(redis, Keys(settings.namespace), settings.drain.topic)
        for letter in letters:
            if as_json:
                click.echo(json.dumps(dataclasses.asdict(letter)))
            else:
                click.echo(
                    f"{letter.id}  {letter.group}  {letter.user}  {letter.data!r}  {letter.error}"
                )
        if not letters and not as_json:
            click.echo("no dead letters", err=True)

    _run(run)


@dlq.command("replay")
@config_option
@click.option("--redis-url", metavar="URL")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.argument("ids", nargs=-1)
@click.pass_context
def dlq_replay(
    ctx: click.Context,
    config: str | None,
    redis_url: str | None,
    replay_all: bool,
    ids: tuple[str, ...],
) -> None:
    """Publish dead letters (by ID, or --all) to the topic again."""
    if bool(ids) == replay_all:
        _fail(UsageError("dlq replay: give dead-letter IDs or --all (not both)"))
    settings = _settings(ctx, config, redis_url=redis_url)

    async def run() -> None:
        from drainbus.bus.streams import Keys
        from drainbus.drain.dead_letters import replay_dead_letters

        async with _tool_redis(settings) as (redis, _):
            try:
                done = await replay_dead_letters(
                    redis,
                    Keys(settings.namespace),
                    settings.drain.topic,
                    None if replay_all else list(ids),
                )
            except KeyError as exc:
                raise UsageError(f"no dead letter {exc.args[0]}") from None
        click.echo(f"replayed {len(done)} dead letter(s)")

    _run(run)


# --- keys ------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Manage users: keys/users/NAME.pub files, one per user."""


@keys.command("add")
@config_option
@click.argument("name")
@click.argument("pubkey_file", type=click.File("r"))
@click.pass_context
def keys_add(ctx: click.Context, config: str | None, name: str, pubkey_file: Any) -> None:
    """Give user NAME the key(s) in PUBKEY_FILE ('-' for stdin)."""
    settings = _settings(ctx, config)
    users = UserKeys(settings.server.users_dir, settings.server.admins)
    try:
        results = users.add(
            name,
            pubkey_file.read(),
            source=pubkey_file.name,
            acl_topics=[t for rule in settings.acl for t in rule.topics] + [settings.drain.topic],
            owner_separator=settings.drain.owner_separator,
        )
    except DrainbusError as exc:
        _fail(exc)
    for fingerprint, added in results:
        click.echo(
            f"{name}: added {fingerprint}" if added else f"{name}: {fingerprint} already present"
        )


@keys.command("ls")
@config_option
@click.pass_context
def keys_ls(ctx: click.Context, config: str | None) -> None:
    """List users, their key fingerprints, and who is admin."""
    settings = _settings(ctx, config)
    users = UserKeys(settings.server.users_dir, settings.server.admins)
    users.reload()
    for name, user_keys in sorted(users.users.items()):
        role = " (admin)" if user_key(name) in users.admins else ""
        for key in user_keys:
            comment = key.get_comment() or ""
            click.echo(f"{name}{role}\t{key.get_fingerprint()}\t{key.get_algorithm()}\t{comment}")


@keys.command("rm")
@config_option
@click.argument("name")
@click.argument("fingerprint", required=False)
@click.pass_context
def keys_rm(ctx: click.Context, config: str | None, name: str, fingerprint: str | None) -> None:
    """Remove user NAME, or only their key with FINGERPRINT (SHA256:…)."""
    settings = _settings(ctx, config)
    try:
        UserKeys(settings.server.users_dir, settings.server.admins).remove(name, fingerprint)
    except DrainbusError as exc:
        _fail(exc)
    click.echo(f"{name}: removed" + (f" {fingerprint}" if fingerprint else ""))


cli.add_command(pub)
cli.add_command(hook)
cli.add_command(tokens)


def main() -> None:
    """Console-script entry point."""
    cli(obj={})
