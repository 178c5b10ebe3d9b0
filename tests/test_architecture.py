"""The package's shape: no import cycles, so each module can be read and changed on its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "drainbus"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """drainbus modules imported anywhere in ``tree`` (deferred ones too), not under
    ``if TYPE_CHECKING:``, with the packages Python imports on the way."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(name for name in [node.module, *names] if name in modules)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    with_parents = set(found)
    for name in found:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        with_parents |= _packages_of(name)
    return with_parents & modules


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    # A module's own packages are already being imported when it runs: not an edge.
    return {
        name: _imports(ast.parse(path.read_text()), modules) - {name, *_packages_of(name)}
        for name, path in paths.items()
    }


def _packages_of(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for successor in sorted(graph[node]):
            if found := walk(successor):
                return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if found := walk(start):
            return found
    return None


def test_no_import_cycle_in_the_package() -> None:
    """No drainbus module imports, however indirectly or late, a module that imports it.

    The package root (``drainbus/__init__``) re-exports the public API and is left out: it
    imports everything by design, and nothing inside the package imports it.
    """
    graph = _import_graph()
    graph.pop("drainbus")
    for successors in graph.values():
        successors.discard("drainbus")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a -> b -> c -> a is reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
