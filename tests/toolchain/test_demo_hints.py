"""The demo's closing hints work in a fresh shell (issue 11, what to build 8)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.demo import cli_command, path_hint

BIN = Path(sys.executable).parent
FRESH_PATH = "/usr/local/bin:/usr/bin:/bin"  # a new login shell: no virtual environment active


@pytest.mark.skipif(not (BIN / "edgefleet").exists(), reason="edgefleet script not installed beside python")
def test_hints_name_a_command_a_fresh_shell_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", FRESH_PATH)
    cmd = cli_command()
    assert Path(cmd).is_absolute() and Path(cmd).exists()
    hint = path_hint()
    assert hint is not None
    text = "\n".join(hint)
    assert f"source {shlex.quote(str(BIN / 'activate'))}" in text and str(BIN / "edgefleet") in text
    env = {"PATH": FRESH_PATH, "HOME": os.environ.get("HOME", "/root")}
    res = subprocess.run([*shlex.split(cmd), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "fleet" in res.stdout
    # the activation the hint names puts `edgefleet` on PATH in a fresh shell
    script = f"source {shlex.quote(str(BIN / 'activate'))} && command -v edgefleet"
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and Path(res.stdout.strip()).resolve() == (BIN / "edgefleet").resolve()


@pytest.mark.skipif(not (BIN / "edgefleet").exists(), reason="edgefleet script not installed beside python")
def test_no_path_hint_when_edgefleet_is_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{FRESH_PATH}")
    assert cli_command() == "edgefleet" and path_hint() is None


# --------------------------------------------------------------------------------------------------
# Pasted into a fresh shell, from an installation whose path holds a space


def _venv_with_a_space(root: Path) -> Path:
    """A real venv at ``root/my tools/venv`` that runs this checkout (a .pth file) with an ``edgefleet``
    script written as pip writes one when the interpreter's path holds a space."""
    import site

    venv = root / "my tools" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (pure,) = list((venv / "lib").glob("python3*/site-packages"))
    repo = Path(__file__).resolve().parents[2]
    (pure / "edgefleet-test.pth").write_text("\n".join([str(repo), *site.getsitepackages()]) + "\n")
    py = venv / "bin" / "python"
    script = venv / "bin" / "edgefleet"
    script.write_text(
        "#!/bin/sh\n"
        f"'''exec' {shlex.quote(str(py))} \"$0\" \"$@\"\n"
        "' '''\n"
        "import sys\nfrom toolchain.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return venv


def _commands(lines: list[str]) -> list[str]:
    return [line.split("$ ", 1)[1] for line in lines if line.lstrip().startswith("$ ")]


@pytest.mark.slow
def test_printed_hints_work_pasted_into_a_fresh_shell_with_spaces_in_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolchain.demo import fleet_status_hint

    venv = _venv_with_a_space(tmp_path)
    monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
    monkeypatch.setenv("PATH", FRESH_PATH)
    hint = path_hint()
    assert hint is not None and " on your PATH" in hint[0]
    db = tmp_path / "demo out" / "fleet.db"
    db.parent.mkdir()
    from toolchain.fleet.storage import open_store

    open_store(f"sqlite:///{db}").close()  # the demo's database, empty
    commands = [*_commands(hint), fleet_status_hint(f"sqlite:///{db}")]
    assert len(commands) == 3 and all("my tools" in c for c in commands)
    where = tmp_path / "some other dir"
    where.mkdir()
    env = {"PATH": FRESH_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    for cmd in commands:
        res = subprocess.run(
            ["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=where, timeout=180
        )
        assert res.returncode == 0, (cmd, res.stderr[-2000:])
        assert "Usage:" in res.stdout or "device" in res.stdout.lower(), (cmd, res.stdout[-500:])
    # the activation really put this installation's edgefleet first on PATH
    res = subprocess.run(
        ["bash", "-c", commands[0].replace("edgefleet --help", "command -v edgefleet")],
        capture_output=True,
        text=True,
        env=env,
        cwd=where,
        timeout=60,
    )
    assert res.stdout.strip() == str(venv / "bin" / "edgefleet")
