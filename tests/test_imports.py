"""The import graph of search/, trainables/ and spaces/, read with `ast`: no circles (every import counts,
in functions and under TYPE_CHECKING too), and the layering rules of DESIGN.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("search", "trainables", "spaces")


def _module_name(path: Path) -> str:
    parts = ["flatbasin", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


FILES = _files()
# flatbasin itself and the sub-packages: a module name that exists in the tree.
KNOWN = set(FILES) | {"flatbasin"}


def _imports(name: str, source: str, is_package: bool) -> list[str]:
    """Every module name `name` imports, flatbasin's and others', wherever the import statement is."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # A relative import starts from the package: the module's own name for an __init__.
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append(sub if sub in KNOWN else module)
    return found


IMPORTS = {
    name: _imports(name, path.read_text(), path.name == "__init__.py")
    for name, path in FILES.items()
}


def _edges(within: str) -> dict[str, set[str]]:
    """flatbasin-internal edges between modules under `within` (a dotted prefix)."""
    inside = {n for n in FILES if n == within or n.startswith(within + ".")}
    edges: dict[str, set[str]] = {n: set() for n in inside}
    for n in inside:
        for target in IMPORTS[n]:
            # `import flatbasin.trainables.loop` names a module; the nearest known ancestor otherwise.
            while target and target not in KNOWN:
                target = target.rpartition(".")[0]
            if target in inside and target != n:
                edges[n].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components larger than one (Tarjan), each as a sorted list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], edges: dict[str, set[str]]) -> str:
    """One circle through the component's first module, then every edge inside the component."""
    members = set(component)
    start = component[0]
    # Breadth-first search back to `start`: the shortest circle through it.
    parent: dict[str, str] = {}
    frontier = [start]
    circle: list[str] = []
    while frontier and not circle:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    circle = [start]
                    u = v
                    while u != start:
                        circle.append(u)
                        u = parent[u]
                    circle = [start, *reversed(circle[1:]), start]
                    break
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
            if circle:
                break
        frontier = nxt
    inner = "\n".join(f"    {v} -> {w}" for v in component for w in sorted(edges[v] & members))
    return f"{len(component)} modules; one circle: {' -> '.join(circle)}\n  edges:\n{inner}"


@pytest.mark.parametrize("package", [*PACKAGES, "all"])
def test_no_import_cycles(package: str) -> None:
    edges = _edges("flatbasin" if package == "all" else f"flatbasin.{package}")
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, edges) for c in cycles)


def test_the_graph_sees_every_kind_of_import() -> None:
    """The parser counts imports in functions, under TYPE_CHECKING and relative ones: a graph that
    missed them would pass for the wrong reason."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import loop\n"
        "from .variants import base\n"
        "if TYPE_CHECKING:\n"
        "    from flatbasin.trainables.config import TrialConfig\n"
        "def f():\n"
        "    import flatbasin.trainables.data\n"
        "    from ..search import tuner\n"
    )
    found = set(_imports("flatbasin.trainables.probe", source, is_package=False))
    assert {
        "flatbasin.trainables.loop",
        "flatbasin.trainables.variants.base",
        "flatbasin.trainables.config",
        "flatbasin.trainables.data",
        "flatbasin.search.tuner",
    } <= found
    # In a package's __init__, `from . import x` is relative to the package itself.
    assert _imports("flatbasin.trainables.variants", "from . import sgd\n", is_package=True) == [
        "flatbasin.trainables.variants.sgd"
    ]
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert "a -> b -> c -> a" in _describe(["a", "b", "c"], edges)


def _third_party(name: str) -> set[str]:
    return {m.split(".")[0] for m in IMPORTS[name] if not m.startswith("flatbasin")}


@pytest.mark.parametrize("name", sorted(n for n in FILES if n.startswith("flatbasin.trainables")))
def test_trainables_layering(name: str) -> None:
    """trainables/ runs with plain python: no MLflow, no Optuna; Ray only through ray_entry.py."""
    outside = _third_party(name)
    assert not outside & {"mlflow", "optuna"}, f"{name} imports {outside & {'mlflow', 'optuna'}}"
    if name != "flatbasin.trainables.ray_entry":
        assert "ray" not in outside, f"{name} imports ray; only trainables/ray_entry.py may"
