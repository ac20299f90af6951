"""The package boundaries, read from the import statements (``ast``, nothing is imported).

* The host (``toolchain/``, ``benchmarks/``) reaches the device package only through
  ``device_agent.formats`` (what both sides share), ``device_agent.runtimes`` (public names) and the
  public names of ``device_agent.agent`` (its ``__all__``).
* ``device_agent`` never imports ``toolchain`` or TensorFlow, not even inside a function.
* ``device_agent.formats`` depends on nothing of the device but its root error and the fold kernels.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST_DIRS = ("toolchain", "benchmarks")
HOST_MODULES = ("device_agent.formats", "device_agent.runtimes")
# benchmarks/agent_bench.py measures the device's own internals (the window fold, the kernels'
# runner, the API's JSON decoder) side by side with the public path, so it may name these too.
DEVICE_INTERNALS_BENCH = {
    "benchmarks/agent_bench.py": {"device_agent.windows", "device_agent.kernels", "device_agent.api"},
}
FORMATS_MAY_USE = ("device_agent.formats", "device_agent.errors", "device_agent.kernels")
DEVICE_NEVER = ("toolchain", "tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "tf2onnx")


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """Yield (line, module, imported names) for every import in a file, top level or nested."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "device_agent":
            for a in node.names:  # ``from device_agent import kernels`` is an import of device_agent.kernels
                if a.name == "Agent":  # loaded lazily from device_agent.agent
                    yield node.lineno, "device_agent.agent", ["Agent"]
                else:
                    yield node.lineno, f"device_agent.{a.name}", []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]


def _under(module: str, roots: tuple[str, ...] | set[str]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def _agent_public(repo: Path) -> set[str]:
    tree = ast.parse((repo / "device_agent" / "agent.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("device_agent/agent.py has no __all__")


def host_violations(files: list[Path], repo: Path = REPO) -> list[str]:
    """Every import of the device package by host code outside the allowed surface."""
    public = _agent_public(repo)
    bad = []
    for path in files:
        rel = path.relative_to(repo).as_posix()
        internals = DEVICE_INTERNALS_BENCH.get(rel, set())
        for line, module, names in _imports(path):
            where = f"{rel}:{line}"
            if not _under(module, ("device_agent",)) or _under(module, internals):
                continue
            if module == "device_agent":
                bad.append(f"{where}: import device_agent (import a public module instead)")
                continue
            if _under(module, HOST_MODULES):
                private = [n for n in names if n.startswith("_")]
                if private:
                    bad.append(f"{where}: private name(s) {private} from {module}")
                continue
            if module == "device_agent.agent":
                hidden = [n for n in names if n not in public]
                if hidden:
                    bad.append(f"{where}: {hidden or 'module'} not in device_agent.agent.__all__")
                continue
            bad.append(f"{where}: {module} (use device_agent.formats, .runtimes or .agent)")
    return bad


def test_host_imports_the_device_only_through_formats_runtimes_and_agent() -> None:
    bad = host_violations(_files(*HOST_DIRS))
    assert not bad, "host imports device internals:\n" + "\n".join(bad)


def test_device_agent_never_imports_the_host_or_tensorflow() -> None:
    bad = [
        f"{p.relative_to(REPO)}:{line}: {module}"
        for p in _files("device_agent")
        for line, module, _ in _imports(p)
        if _under(module, DEVICE_NEVER)
    ]
    assert not bad, "device_agent imports the host side or TensorFlow:\n" + "\n".join(bad)


def test_formats_stand_alone() -> None:
    bad = [
        f"{p.relative_to(REPO)}:{line}: {module}"
        for p in _files("device_agent/formats")
        for line, module, _ in _imports(p)
        if _under(module, ("device_agent",)) and not _under(module, FORMATS_MAY_USE)
    ]
    assert not bad, "device_agent.formats depends on device internals:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source,ok",
    [
        ("from device_agent.formats.manifest import load_manifest\n", True),
        ("from device_agent.runtimes.litert import interpreter_module\n", True),
        ("from device_agent.agent import Agent, quantize\n", True),
        ("from device_agent import Agent\n", True),
        ("def f():\n    from device_agent.store import PARTIAL_SUFFIX\n", False),  # nested imports count
        ("from device_agent.bundle import Manifest\n", False),  # the old path
        ("from device_agent.runtimes.litert import _interpreter_module\n", False),
        ("from device_agent.agent import Window\n", False),  # not in __all__
        ("import device_agent.daemon\n", False),
        ("from device_agent import daemon\n", False),
    ],
)
def test_the_rule_catches_what_it_should(tmp_path: Path, source: str, ok: bool) -> None:
    (tmp_path / "device_agent").mkdir()
    (tmp_path / "device_agent" / "agent.py").write_text((REPO / "device_agent" / "agent.py").read_text())
    (tmp_path / "toolchain").mkdir()
    made_up = tmp_path / "toolchain" / "x.py"
    made_up.write_text(source)
    violations = host_violations([made_up], tmp_path)
    assert (not violations) is ok, violations
