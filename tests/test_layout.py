"""The shape of the code: the Flower-free core imports no Flower, the project's modules form no import cycle
when they load, and no source file grows past a readable size. Needs neither a model nor a simulation."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# source folder -> the package it installs as (pyproject.toml: package-dir)
SOURCES = {"fedlora": "fedlora", "strategies": "fedlora.strategies", "clients": "fedlora.clients"}
MAX_LINES = 500


def _submodules(package: str) -> list[str]:
    """``package`` and, if it is a folder, the modules in it (what exists in this checkout)."""
    folder = ROOT / Path(*package.split("."))
    if folder.is_dir():
        subs = sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")
        return ([package] if (folder / "__init__.py").exists() else []) + subs
    return [package] if folder.with_suffix(".py").exists() else []


def flower_free_core() -> list[str]:
    mods = [f"fedlora.{m}" for m in ("algebra", "adapters", "merges", "validate", "data", "models", "train",
                                     "config", "quant", "kernels")]
    mods += _submodules("fedlora.privacy")
    mods += _submodules("fedlora.fedpipe")
    return mods


def test_core_modules_import_no_flower():
    """Every core module, imported one after another in a fresh interpreter: none of them loads Flower (the first
    one after whose import any ``flwr`` module is loaded is named)."""
    code = ("import sys, importlib\n"
            f"for m in {flower_free_core()!r}:\n"
            "    importlib.import_module(m)\n"
            "    flower = sorted(n for n in sys.modules if n == 'flwr' or n.startswith('flwr.'))\n"
            "    if flower:\n"
            "        print(m, ' '.join(flower[:5]))\n"
            "        break\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not p.stdout.strip(), f"importing this module loads Flower: {p.stdout.strip()}"
    assert len(flower_free_core()) >= 20  # the privacy and fedpipe packages' modules are in the list


# ----------------------------------------------------------------------------------------------
# The import graph, read from the source (module-level imports only)
# ----------------------------------------------------------------------------------------------
def project_modules() -> dict[str, Path]:
    """Dotted name (as installed) -> file, for every module of fedlora/, strategies/ and clients/."""
    mods = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _load_time_imports(body: list[ast.stmt]):
    """Import statements that run when the module loads: not inside a function (a deliberate lazy import) and
    not under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _load_time_imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _load_time_imports([n for n in inner if isinstance(n, ast.AST)])


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(mod: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, mods) -> list[str]:
    """The dotted names an import statement in module ``mod`` loads (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = mod if is_pkg else mod.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it loads when it loads. ``import a.b.c`` also runs the packages ``a`` and
    ``a.b`` (their ``__init__``), except those the importing module lies in (already loading)."""
    mods = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        own = set(_ancestors(mod)) | ({mod} if is_pkg else set())
        for node in _load_time_imports(ast.parse(path.read_text(), filename=str(path)).body):
            for t in _imported(mod, is_pkg, node, mods):
                while t and t not in mods:  # `from fedlora.x import Name`: the deepest project module named
                    t = t.rpartition(".")[0]
                for m in [*_ancestors(t), t] if t else []:
                    if m in mods and m not in own and m != mod:
                        graph[mod].add(m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component of more than one module."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # a concrete path through the component: breadth-first from its first module back to it
        start = min(comp)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        out.append(list(reversed(path)) + [start])
    return out


def test_import_graph_sees_the_project():
    graph = import_graph()
    assert {"fedlora.cli", "fedlora.strategies.server_app", "fedlora.clients.client_app"} <= set(graph)
    assert "fedlora.config" in graph["fedlora.preflight"]  # relative imports resolve
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level imports): " + "; ".join(" -> ".join(c) for c in found)


def test_nothing_imports_the_cli():
    """The command line is the top layer: no module imports it, not even lazily (compare used to)."""
    mods, offenders = project_modules(), []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and mod != "fedlora.cli":
                names = _imported(mod, path.name == "__init__.py", node, mods)
                if any(n == "fedlora.cli" or n.startswith("fedlora.cli.") for n in names):
                    offenders.append(f"{mod} (line {node.lineno})")
    assert not offenders, f"these import fedlora.cli: {offenders}"


def test_no_source_file_over_500_lines():
    long = {}
    for path in project_modules().values():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            long[str(path.relative_to(ROOT))] = n
    assert not long, f"over {MAX_LINES} lines: {long}"
