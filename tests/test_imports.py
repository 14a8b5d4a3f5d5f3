"""The package's import graph has no cycles, and modules that used to form one import on their own."""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import echo_stream

ROOT = Path(echo_stream.__file__).parent


def _modules() -> dict[str, Path]:
    """``echo_stream.*`` module name -> source file, with the packages pyproject maps from other folders."""
    roots = {"echo_stream": ROOT}
    for pkg in ("echo_stream.kernels", "echo_stream.actors"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.origin:
            roots[pkg] = Path(spec.origin).parent
    mods = {}
    for prefix, root in roots.items():
        for p in root.rglob("*.py"):
            parts = p.relative_to(root).with_suffix("").parts
            name = ".".join((prefix,) + (parts[:-1] if parts[-1] == "__init__" else parts))
            mods.setdefault(name, p)
    return mods


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside functions (a module's own parent
    packages left out: importing a submodule always imports them)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    assert "echo_stream.dataset" in graph and "echo_stream.preprocess" in graph["echo_stream.dataset"]
    assert _cycles(graph) == []


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_every_relative_import_names_something_that_exists():
    """Also the imports inside functions, which only run when called (a module moved into a package must
    have its ``from . import x`` moved up a level)."""
    mods = _modules()
    missing = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            base = ".".join(up + ([node.module] if node.module else []))
            if base not in mods:
                missing.append(f"{name}:{node.lineno}: no module {base}")
                continue
            defined = _top_level_names(mods[base])
            for a in node.names:
                if f"{base}.{a.name}" not in mods and a.name not in defined and a.name != "*":
                    missing.append(f"{name}:{node.lineno}: {base} has no {a.name}")
    assert missing == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["echo_stream.preprocess", "echo_stream.dataset", "echo_stream.shards",
                                    "echo_stream.featurize", "echo_stream.stages.decode",
                                    "echo_stream.stages.warmup"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
