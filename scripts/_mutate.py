"""Mutation testing of drainbus's core, one module at a time (run by ``scripts/mutate``).

mutmut 3 copies the package into ``mutants/``, turns every function into a trampoline that
can switch to one of its mutants, and runs pytest in-process there. So only in-process tests
can kill a mutant: a test that starts ``python -m drainbus`` runs the installed, unmutated
code. ``MODULES`` names, per module, the fast in-process test files that cover it; mutmut then
runs, for each mutant, only the tests of those that call the mutated function. mutmut leaves
decorated functions unmutated, so a memo wraps a plain function (``f = lru_cache(...)(_f)``);
tests/conftest.py clears the memos before each test, as each mutant runs in a fork of a
process that already ran the tests and would otherwise read its remembered answers.

Usage: scripts/mutate [MODULE...] [-- MUTANT_GLOB...]
    MODULE is a path (drainbus/acl.py) or a short name (acl, fanout). No MODULE: the modules
    in DEFAULT. MUTANT_GLOB narrows the run (drainbus.acl.x_glob_to_regex*).
Prints each survivor as a diff, then killed/total per module and the survivors' names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# mutmut reads its settings from ./pyproject.toml on import: scripts/mutate runs from the root.
from mutmut.__main__ import cli, status_by_exit_code
from mutmut.configuration import config

# Module -> the fast in-process test files that cover it. mutmut runs every test that
# reaches a surviving mutant's function, so the tests driving OpenSSH (test_ssh, test_packing,
# test_bus: seconds each) would make a run take hours: they are left out, and so are the
# tests in the listed files that start nginx, publish over OpenSSH or run drainbus in a
# process of its own (tests/in_process_only.py). What they reach beyond these tests (the
# fan-out's retry paths when Redis fails) is in the README.
MODULES: dict[str, list[str]] = {
    "drainbus/bus/fanout.py": ["tests/test_fanout.py", "tests/test_streams.py"],
    "drainbus/bus/streams.py": [
        "tests/test_streams.py",
        "tests/test_publisher.py",
        "tests/test_fanout.py",
    ],
    # test_limits' other tests drive OpenSSH; these four run the Publisher in process.
    "drainbus/bus/publisher.py": [
        "tests/test_publisher.py",
        "tests/test_publisher_limits.py",
        "tests/test_streams.py",
        "tests/test_limits.py::test_refusals_are_logged_per_user_topic_and_interval",
        "tests/test_limits.py::test_a_leaked_reservation_is_recounted_before_it_refuses",
        "tests/test_limits.py::test_a_lowered_byte_cap_trims_many_entries_at_once_keeping_the_newest",
        "tests/test_limits.py::test_a_full_server_is_a_clear_75_and_loses_nothing",
    ],
    "drainbus/acl.py": ["tests/test_acl.py"],
    "drainbus/identity.py": [
        "tests/test_identity.py",
        "tests/test_acl.py",
        "tests/test_cli_keys.py",
    ],
    "drainbus/drain/purges.py": ["tests/test_purges.py"],
    "drainbus/drain/scope.py": ["tests/test_purges.py"],
    "drainbus/drain/url_rules.py": ["tests/test_purges.py"],
    # The drain daemon and the parts that record what it did: test_drain's and
    # test_receipts' tests publish over OpenSSH or start nginx (left out); these run it in
    # process against the suite's Redis. test_fair_drain's in-process test is not run for
    # them: it times keep-alives 0.1 s apart against a 0.3 s reclaim, which mutmut's
    # trampolines on a loaded machine overrun (its clean run failed).
    "drainbus/drain/daemon.py": ["tests/test_drain_daemon.py", "tests/test_drain_recovery.py"],
    "drainbus/drain/ledger.py": [
        "tests/test_ledger.py",
        "tests/test_drain_daemon.py",
        "tests/test_drain_recovery.py",
    ],
    "drainbus/drain/receipt_writer.py": [
        "tests/test_receipt_writer.py",
        "tests/test_ledger.py",
        "tests/test_refill_receipts.py",
    ],
    "drainbus/drain/refill_receipts.py": ["tests/test_refill_receipts.py"],
    "drainbus/drain/key_template.py": ["tests/test_key_template.py", "tests/test_nginx.py"],
    # test_cache_file builds files byte by byte; test_nginx's index tests and test_refill
    # read the heads of the files they write.
    "drainbus/drain/cache_file.py": [
        "tests/test_cache_file.py",
        "tests/test_nginx.py",
        "tests/test_refill.py",
    ],
    "drainbus/drain/nginx_index.py": ["tests/test_nginx_index.py", "tests/test_nginx.py"],
    "drainbus/drain/cache_scan.py": ["tests/test_nginx_index.py", "tests/test_nginx.py"],
    # The drain's parts, each with its own tests and the in-process drain tests (those that
    # publish over OpenSSH or start nginx are left out: tests/in_process_only.py).
    "drainbus/drain/groups.py": ["tests/test_groups.py", "tests/test_drain_recovery.py"],
    "drainbus/drain/roles.py": [
        "tests/test_roles.py",
        "tests/test_drain_recovery.py",
        "tests/test_fair_drain.py",
    ],
    "drainbus/drain/missed.py": ["tests/test_missed.py", "tests/test_drain_recovery.py"],
    "drainbus/drain/fair.py": ["tests/test_fair.py", "tests/test_fair_drain.py"],
    "drainbus/drain/call_acks.py": ["tests/test_call_acks.py"],
}
DEFAULT = [
    "drainbus/bus/fanout.py",
    "drainbus/bus/streams.py",
    "drainbus/bus/publisher.py",
    "drainbus/acl.py",
    "drainbus/identity.py",
    "drainbus/drain/purges.py",
    "drainbus/drain/scope.py",
    "drainbus/drain/url_rules.py",
    "drainbus/drain/key_template.py",
    "drainbus/drain/cache_file.py",
    "drainbus/drain/nginx_index.py",
    "drainbus/drain/cache_scan.py",
    "drainbus/drain/groups.py",
    "drainbus/drain/roles.py",
    "drainbus/drain/missed.py",
    "drainbus/drain/fair.py",
    "drainbus/drain/call_acks.py",
    "drainbus/drain/daemon.py",
    "drainbus/drain/ledger.py",
    "drainbus/drain/receipt_writer.py",
    "drainbus/drain/refill_receipts.py",
]


def resolve(name: str) -> str:
    """The MODULES key for a path or a short name; exits naming the choices otherwise."""
    matches = [m for m in MODULES if name in (m, Path(m).stem, m.removesuffix(".py"))]
    if len(matches) != 1:
        sys.exit(f"module {name!r} is not configured: use one of {', '.join(MODULES)}")
    return matches[0]


# Modules whose tests publish to a Redis Cluster (the redis_cluster_url fixture): the run
# starts one for all their mutants, as a cluster per mutant would take 2 s each.
NEEDS_CLUSTER = frozenset({"drainbus/bus/publisher.py"})


def start_servers(tmp: Path, *, cluster: bool) -> subprocess.Popen[str]:
    """One Redis (and, if asked, one Redis Cluster) for every mutant's tests, in a process of
    its own.

    Started in a child so this process never imports drainbus: the tests must import the
    mutated copy in mutants/, not the package already in sys.modules.
    """
    code = (
        "import sys; from contextlib import ExitStack; from pathlib import Path\n"
        "from drainbus.bus.embedded import EmbeddedRedis\n"
        "with ExitStack() as stack:\n"
        "    server = stack.enter_context(EmbeddedRedis(Path(sys.argv[1]) / 'redis'))\n"
        "    print('url', server.url, flush=True)\n"
        "    if sys.argv[2:]:\n"
        "        from tests.redis_topology import start_cluster\n"
        "        nodes = stack.enter_context(start_cluster(Path(sys.argv[1]) / 'cluster'))\n"
        "        print('cluster', nodes.url, flush=True)\n"
        "    sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp), *(["cluster"] if cluster else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    # The servers' own log lines come first; the URLs are on the lines naming them.
    wanted = {"url": "DRAINBUS_TEST_REDIS_URL"}
    if cluster:
        wanted["cluster"] = "DRAINBUS_TEST_CLUSTER_URL"
    for line in proc.stdout:
        name, _, url = line.strip().partition(" ")
        if name in wanted:
            os.environ[wanted.pop(name)] = url
        if not wanted:
            return proc
    sys.exit(f"could not start the servers for the mutation run (no {', '.join(wanted)})")


def mutant_glob(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".") + ".*"


def score(module: str) -> tuple[int, int, list[str]]:
    """(killed, total, names of the others) for MODULE, from mutmut's results file."""
    meta = json.loads((Path("mutants") / f"{module}.meta").read_text())
    statuses = {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}
    # Not run, when only some mutants were named: not part of this score.
    statuses = {name: s for name, s in statuses.items() if s != "not checked"}
    # A timeout is a mutant the tests stopped (pytest-timeout fails a hung test first).
    caught = {"killed", "timeout"}
    others = sorted(f"{name}: {s}" for name, s in statuses.items() if s not in caught)
    return len(statuses) - len(others), len(statuses), others


def run(module: str, globs: list[str]) -> None:
    cfg = config()
    cfg.only_mutate = [module]
    cfg.pytest_add_cli_args_test_selection = MODULES[module]
    # These tests take a second or two: a mutant that hangs one is caught in 5 s, not 30.
    # The tests that start nginx are left out (tests/in_process_only.py says why).
    cfg.pytest_add_cli_args = [
        *cfg.pytest_add_cli_args,
        "--timeout=5",
        "-p",
        "tests.in_process_only",
    ]
    # One worker: the machine is shared. Naming the mutants re-runs them all, so the score
    # reflects today's tests, not results cached from an earlier run.
    cli(["run", "--max-children", "1", *(globs or [mutant_glob(module)])], standalone_mode=False)


def main(argv: list[str]) -> None:
    globs: list[str] = []
    if "--" in argv:
        argv, globs = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    modules = [resolve(name) for name in argv] or DEFAULT
    if globs and len(modules) != 1:
        sys.exit("name one module with mutant globs")
    with tempfile.TemporaryDirectory(prefix="db-mut-") as tmp:
        servers = start_servers(Path(tmp), cluster=bool(NEEDS_CLUSTER & set(modules)))
        try:
            results = {}
            for module in modules:
                # Each module is its own mutmut run, from scratch: mutmut keeps the mutants/
                # of the last run and would not mutate a file it had copied unmutated.
                shutil.rmtree("mutants", ignore_errors=True)
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        run(module, globs)
                        code = 0
                    except SystemExit as exc:
                        code = exc.code if isinstance(exc.code, int) else 1
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    sys.exit(f"mutmut failed on {module}; its output is above")
                results[module] = score(module)
                # mutants/ holds this module's mutants only until the next module's run.
                for line in results[module][2]:
                    cli(["show", line.split(":")[0]], standalone_mode=False)
        finally:
            assert servers.stdin is not None
            servers.stdin.close()
            servers.wait()
    print("\nmutation score (killed / total):")
    for module, (killed, total, _) in results.items():
        print(f"  {module:32} {killed:4} / {total:<4}")
    for _, _, others in results.values():
        for line in others:
            print(f"  not killed: {line}")


if __name__ == "__main__":
    main(sys.argv[1:])
