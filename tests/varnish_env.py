"""A real Varnish with drainbus's shipped VCL in front of the test origin, for tests.

Use the fixture::

    from tests.varnish_env import VarnishEnv, varnish_env

    def test_something(varnish_env: VarnishEnv) -> None:
        assert varnish_env.get("/", host="acme-blog.pages.example").cache == "MISS"

``varnishd`` runs in the foreground (``-F``) with its working folder in the test's temporary
folder, no jail (``-j none``: the unix jail wants to switch users, which a container's root
does not need and a normal user cannot do), a 32 MB ``malloc`` storage and the listen port
chosen by the kernel (``-a 127.0.0.1:0``; ``varnishadm debug.listen_address`` tells which),
so parallel runs never race for a port. Its VCL is a backend pointing at the
:class:`~tests.nginx_env.Origin` plus ``include "drainbus.vcl";`` looked up, as on a
server, in ``vcl_path``, here ``examples/varnish/``: the file operators copy is the file
tested.

When ``varnishd`` is not installed the fixture skips with the reason and the command that
installs it (``scripts/_bootstrap.sh`` installs it wherever the suite runs as root, as CI
does); any other failure to start fails the test with varnishd's output.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.nginx_env import Origin, Response, run_origin

__all__ = [
    "EXAMPLES",
    "Varnish",
    "VarnishEnv",
    "find_varnishd",
    "run_varnish",
    "run_varnish_env",
    "varnish_env",
]

#: The folder holding the shipped drainbus.vcl, default.vcl and drainbus.toml.
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "varnish"

_INSTALL = "apt-get install -y varnish varnish-modules"
_START_DEADLINE_S = 30.0  # compiling the VCL runs a C compiler
_STOP_DEADLINE_S = 10.0


def find_varnishd() -> str:
    """The varnishd binary's path; skips the test, saying why, when Varnish is not installed."""
    found = shutil.which("varnishd") or shutil.which("varnishd", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip(f"varnishd is not installed: run `{_INSTALL}` to test against real Varnish")
    return found


def _varnishadm(varnishd: str) -> str:
    found = shutil.which("varnishadm") or str(Path(varnishd).with_name("varnishadm"))
    if not Path(found).exists():
        pytest.fail(f"varnishadm is missing next to {varnishd}: run `{_INSTALL}`")
    return found


@dataclass
class Varnish:
    """A running varnishd: its port, working folder and everything it printed."""

    process: subprocess.Popen[str]
    workdir: Path
    port: int = 0
    output: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT``, where Varnish listens."""
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        """The last lines varnishd printed, for failure messages."""
        return "\n".join(self.output[-lines:])


def _main_vcl(origin_port: int) -> str:
    return f"""vcl 4.1;

backend default {{
    .host = "127.0.0.1";
    .port = "{origin_port}";
}}

include "drainbus.vcl";
"""


def _follow(varnish: Varnish, started: threading.Event) -> None:
    """Collect varnishd's output; set ``started`` once the child runs or varnishd ended."""
    assert varnish.process.stdout is not None
    for line in varnish.process.stdout:
        varnish.output.append(line.rstrip("\n"))
        if line.startswith("Child launched OK"):
            started.set()
    started.set()


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the manager stops its child, then exits
        try:
            process.wait(timeout=_STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def run_varnish(root: Path, origin_port: int, vcl_path: Path = EXAMPLES) -> Iterator[Varnish]:
    """Run varnishd with the shipped VCL in front of ``origin_port`` until the block ends.

    Returns once the child process runs and its listen port is known; fails the test with
    varnishd's output if that does not happen within the start deadline.
    """
    varnishd = find_varnishd()
    varnishadm = _varnishadm(varnishd)
    root.mkdir(parents=True, exist_ok=True)
    main = root / "main.vcl"
    main.write_text(_main_vcl(origin_port))
    workdir = root / "varnishd"
    argv = [
        varnishd, "-F", "-j", "none", "-n", str(workdir),
        "-a", "127.0.0.1:0", "-T", "127.0.0.1:0",
        "-f", str(main), "-p", f"vcl_path={vcl_path}", "-s", "malloc,32m",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    varnish = Varnish(process, workdir)
    started = threading.Event()
    reader = threading.Thread(target=_follow, args=(varnish, started), daemon=True)
    reader.start()
    try:
        if not started.wait(_START_DEADLINE_S) or process.poll() is not None:
            pytest.fail(
                f"varnishd did not start within {_START_DEADLINE_S} s "
                f"(exit {process.poll()}); if vmod xkey is missing, run `{_INSTALL}`\n"
                f"{varnish.log_tail()}"
            )
        varnish.port = _listen_port(varnishadm, workdir, varnish)
        yield varnish
    finally:
        _stop(process)
        reader.join(timeout=_STOP_DEADLINE_S)
        if process.stdout is not None:
            process.stdout.close()


def _listen_port(varnishadm: str, workdir: Path, varnish: Varnish) -> int:
    """The port the kernel gave ``-a 127.0.0.1:0``: ``debug.listen_address`` prints
    ``a0 127.0.0.1 PORT``."""
    done = subprocess.run(
        [varnishadm, "-n", str(workdir), "-t", "10", "debug.listen_address"],
        capture_output=True,
        text=True,
        check=False,
        timeout=_START_DEADLINE_S,
    )
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] == "127.0.0.1" and fields[2].isdigit():
            return int(fields[2])
    pytest.fail(
        f"varnishadm debug.listen_address gave no port (exit {done.returncode}): "
        f"{done.stdout!r} {done.stderr!r}\n{varnish.log_tail()}"
    )


@dataclass
class VarnishEnv:
    """An origin behind Varnish, plus a client that talks to Varnish."""

    origin: Origin
    varnish: Varnish
    client: httpx.Client

    def get(self, path: str, host: str) -> Response:
        """GET ``path`` (sent as written: percent-escapes keep their case) with ``Host: host``.

        ``cache`` is ``HIT`` when Varnish answered from its cache (``X-Varnish`` names the
        request and the one that stored the object), ``MISS`` otherwise.
        """
        response = self.client.get(self.varnish.base + path, headers={"Host": host})
        cache = "HIT" if len(response.headers.get("X-Varnish", "").split()) == 2 else "MISS"
        return Response(response.status_code, cache, response.text)

    def prime(self, path: str, host: str) -> Response:
        """GET until Varnish serves ``path`` from its cache; fails if it never does."""
        for _ in itertools.repeat(None, 3):
            response = self.get(path, host)
            if response.cache == "HIT":
                return response
        pytest.fail(f"Varnish did not cache {host}{path}: {response}\n{self.varnish.log_tail()}")


@contextlib.contextmanager
def run_varnish_env(root: Path, origin: Origin | None = None) -> Iterator[VarnishEnv]:
    """An origin and Varnish in front of it, both stopped when the block ends."""
    with (
        run_origin(origin) as running_origin,
        run_varnish(root, running_origin.port) as varnish,
        httpx.Client(timeout=5.0) as client,
    ):
        yield VarnishEnv(running_origin, varnish, client)


@pytest.fixture
def varnish_env(tmp_path: Path, origin: Origin) -> Iterator[VarnishEnv]:
    """A fresh Varnish with an empty cache in front of ``origin``, stopped after the test."""
    with run_varnish_env(tmp_path / "varnish", origin) as env:
        yield env
