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
    assert hint is not None and f"source {BIN / 'activate'}" in hint and str(BIN / "edgefleet") in hint
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
