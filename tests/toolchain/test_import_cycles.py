"""No two toolchain modules import each other, directly or through others (read with ``ast``, nothing run).

Every import counts, the ones inside functions too: a lazy import hides a cycle from the
interpreter, not from the reader who has to change one of the modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def package_modules(root: Path = REPO, package: str = "toolchain") -> dict[str, Path]:
    """Return dotted name -> file for every module of ``package`` under ``root``."""
    out: dict[str, Path] = {}
    for p in sorted((root / package).rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """Return the toolchain module that defines ``name`` (``a.b.c`` -> ``a.b`` when c is not a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Return module -> the toolchain modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import; the tree uses absolute ones"
                base = node.module or ""
                # "from toolchain.steps import convert" imports the module toolchain.steps.convert
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            deps.update(o for n in names if (o := _owner(n, modules)) is not None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_reads_every_kind_of_import_and_finds_the_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")  # a name from a module
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n    return c\n")  # a module, lazily
    (pkg / "sub" / "c.py").write_text("import pkg.a\nimport numpy\n")  # plain import; outside ignored
    (pkg / "d.py").write_text("from pkg import a\n")  # imports into the cycle, is not part of it
    graph = import_graph(package_modules(tmp_path, "pkg"))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "sub" / "c.py").write_text("import numpy\n")
    assert cycles(import_graph(package_modules(tmp_path, "pkg"))) == []


def test_no_import_cycle_among_toolchain_modules() -> None:
    found = cycles(import_graph(package_modules()))
    assert found == [], "toolchain modules that import each other (move the shared part down): " + "; ".join(
        " <-> ".join(c) for c in found
    )
