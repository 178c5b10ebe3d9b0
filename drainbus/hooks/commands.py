"""The command line for publishing from this machine: ``drainbus pub`` and ``drainbus hook …``.

These commands exit with sysexits(3) codes like the bus's own commands, a usage error included
(64, not click's 2), so a deploy script treats ``drainbus pub`` and ``ssh bus pub`` alike.
Failures a person can fix are one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import click
import structlog

from drainbus.config import load_settings
from drainbus.errors import ConfigError, DrainbusError, StartupError, UsageError
from drainbus.hooks.client import BusClient
from drainbus.hooks.git import publish_pushed
from drainbus.hooks.settings import HooksSettings
from drainbus.signals import wait_for_stop
from drainbus.sysexits_click import SysexitsCommand, SysexitsGroup

__all__ = ["hook", "pub"]

log = structlog.get_logger("drainbus.hooks")

_F = TypeVar("_F", bound=Callable[..., Any])


def _connection_options(function: _F) -> _F:
    function = click.option(
        "--key",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Private key file (hooks.key; default: ssh-agent, then ~/.ssh/id_*).",
    )(function)
    function = click.option(
        "--port", type=click.IntRange(1, 65535), help="The bus's SSH port (hooks.port; 2222)."
    )(function)
    function = click.option(
        "--host", metavar="HOST", help="The bus's host name (hooks.host; localhost)."
    )(function)
    return click.option(
        "--config",
        "config",
        envvar="DRAINBUS_CONFIG",
        type=click.Path(dir_okay=False),
        help="TOML config file; its [hooks] section (env DRAINBUS_CONFIG).",
    )(function)


def _fail(exc: DrainbusError) -> NoReturn:
    click.echo(f"drainbus: {exc.message}", err=True)
    sys.exit(int(exc.exit_code))


def _load(ctx: click.Context, config: str | None, **overrides: Any) -> HooksSettings:
    """The ``[hooks]`` settings: file, then environment, then these command-line overrides."""
    path = config or (ctx.obj or {}).get("config")
    hooks = {name: value for name, value in overrides.items() if value is not None}
    try:
        settings = load_settings(Path(path) if path else None, {"hooks": hooks})
    except ConfigError as exc:
        _fail(exc)
    section = getattr(settings, "hooks", None)
    if not isinstance(section, HooksSettings):
        _fail(ConfigError("this drainbus has no [hooks] settings (Settings.hooks is missing)"))
    return section


def _run(main: Callable[[], Awaitable[int]]) -> NoReturn:
    """Run ``main`` and exit with its code; a DrainbusError becomes one line and its code."""
    try:
        code = anyio.run(main)
    except* DrainbusError as group:
        _fail(_first_leaf(group))
    except* KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


def _first_leaf(group: BaseExceptionGroup[DrainbusError]) -> DrainbusError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


# --- pub -------------------------------------------------------------------------------


@click.command(cls=SysexitsCommand)
@_connection_options
@click.option(
    "--wait",
    is_flag=False,
    flag_value="10s",
    default=None,
    metavar="DURATION",
    help="Then wait (default 10s; hooks.wait) for every drain node to carry the purges out, "
    "print what each did; exit 75 if one did not, 69 if no drain node is live.",
)
@click.option("--json", "json_receipts", is_flag=True, help="With --wait: receipts as JSON lines.")
@click.argument("topic")
@click.argument("messages", nargs=-1, metavar="[MSG]...")
@click.pass_context
def pub(
    ctx: click.Context,
    *,
    config: str | None,
    host: str | None,
    port: int | None,
    key: Path | None,
    wait: str | None,
    json_receipts: bool,
    topic: str,
    messages: tuple[str, ...],
) -> None:
    """Publish to TOPIC on the bus over SSH: each MSG is one message, else each stdin line.

    The same as `ssh -p PORT HOST pub TOPIC`, and it exits the same way: 0 once every
    message is stored; 64, 65, 69, 75 or 77 as the bus says (its stderr is passed through);
    69 with one line when the bus cannot be reached (connection, host key or key refused).
    The bus, key and known_hosts come from the config's [hooks] section.
    """
    settings = _load(ctx, config, host=host, port=port, key=key, wait=wait)
    if json_receipts and settings.wait is None:
        _fail(UsageError("--json describes purge receipts: use it with --wait"))
    for number, message in enumerate(messages, start=1):
        if "\n" in message or "\r" in message:
            _fail(UsageError(f"MSG {number} contains a line break; give one line per MSG"))

    async def main() -> int:
        async with BusClient(settings).connect() as session:
            if messages:
                result = await session.publish(
                    topic,
                    messages,
                    stderr=sys.stderr.buffer,
                    stdout=sys.stdout.buffer,
                    wait=settings.wait,
                    json_receipts=json_receipts,
                )
            else:
                # Python leaves sys.stdin None when started with fd 0 closed (<&-).
                stdin = None if sys.stdin is None else sys.stdin.fileno()
                result = await session.publish_from(
                    topic,
                    stdin,
                    stdout=sys.stdout.buffer,
                    stderr=sys.stderr.buffer,
                    wait=settings.wait,
                    json_receipts=json_receipts,
                )
        return result.exit_code

    _run(main)


# --- hook ------------------------------------------------------------------------------


@click.group(cls=SysexitsGroup)
def hook() -> None:
    """Publish purges when something changes: a folder of sites, a git push."""


@hook.command("watch")
@_connection_options
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--key-from",
    metavar="TEMPLATE",
    help="Site key from path segments below FOLDER (hooks.key_from; '{0}-{1}').",
)
@click.option(
    "--debounce",
    metavar="DURATION",
    help="Publish a key once its site was quiet this long (hooks.debounce; 2s).",
)
@click.option(
    "--spool",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File of purges not yet stored by the bus (hooks.spool; ~/.local/state/drainbus/spool).",
)
@click.option("--topic", help="Topic to publish to (hooks.topic; cache-drain).")
@click.pass_context
def watch(
    ctx: click.Context,
    *,
    config: str | None,
    host: str | None,
    port: int | None,
    key: Path | None,
    folder: Path,
    key_from: str | None,
    debounce: str | None,
    spool: Path | None,
    topic: str | None,
) -> None:
    """Watch FOLDER and publish the key of every site whose files change.

    With /srv/sites as FOLDER and the template {0}-{1}, a change anywhere under
    /srv/sites/acme/blog/ publishes acme-blog, once per burst of changes. Runs until SIGINT
    or SIGTERM; while the bus is unreachable, keys wait in the spool file and are retried.
    """
    settings = _load(
        ctx,
        config,
        host=host,
        port=port,
        key=key,
        key_from=key_from,
        debounce=debounce,
        spool=spool,
        topic=topic,
    )

    async def main() -> int:
        try:
            from drainbus.hooks.watch import Watcher  # noqa: PLC0415 - needs asyncinotify
        except ImportError as exc:  # asyncinotify is Linux-only
            raise StartupError(f"hook watch needs Linux inotify: {exc}") from None

        watcher = Watcher(folder, settings)
        async with anyio.create_task_group() as task_group:
            await task_group.start(watcher.run)
            await wait_for_stop()
            task_group.cancel_scope.cancel()
        log.info("stopped", pending=len(watcher.pending))
        return 0

    _run(main)


@hook.command("git")
@_connection_options
@click.option(
    "--branch",
    "branches",
    multiple=True,
    metavar="NAME=KEY",
    help="Publish KEY when branch NAME (or a full refs/… name) is pushed; repeatable. "
    "Replaces hooks.branches.",
)
@click.option("--topic", help="Topic to publish to (hooks.topic; cache-drain).")
@click.pass_context
def git(
    ctx: click.Context,
    *,
    config: str | None,
    host: str | None,
    port: int | None,
    key: Path | None,
    branches: tuple[str, ...],
    topic: str | None,
) -> None:
    """Run as a git post-receive hook: publish the keys of the pushed branches.

    Reads git's 'OLD NEW REF' lines on stdin. Deleted branches and branches without a key
    are ignored; when nothing is left, nothing is sent (exit 0). Otherwise exits with the
    publish's exit code, like `drainbus pub`.
    """
    mapping: dict[str, list[str]] = {}
    for option in branches:
        name, equals, line = option.partition("=")
        if not equals or not name.strip() or not line.strip():
            _fail(UsageError(f"--branch {option!r} is not NAME=KEY (like main=acme-blog)"))
        ref = name.strip() if name.strip().startswith("refs/") else f"refs/heads/{name.strip()}"
        mapping.setdefault(ref, []).append(line.strip())
    settings = _load(ctx, config, host=host, port=port, key=key, topic=topic)
    if mapping:  # --branch replaces hooks.branches: the hook script says it all
        settings = HooksSettings.model_validate({**settings.model_dump(), "branches": mapping})
    if not settings.branches:
        _fail(
            UsageError("no branches to publish for: pass --branch main=KEY or set hooks.branches")
        )
    text = sys.stdin.read()

    async def main() -> int:
        result = await publish_pushed(
            settings, text, stderr=sys.stderr.buffer, stdout=sys.stdout.buffer
        )
        return 0 if result is None else result.exit_code

    _run(main)
