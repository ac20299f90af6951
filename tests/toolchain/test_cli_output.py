"""What `edgefleet build` prints: early one-line errors for bad --out paths, no LiteRT chatter on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.steps.package import PackageError, check_output_dir

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"
EDGEFLEET = [sys.executable, "-c", "from toolchain.cli import main; main(prog_name='edgefleet')"]
CLI_TIMEOUT_S = 120


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, cwd=cwd
    )


@pytest.mark.parametrize("out", ["/proc/x", "afile", "afile/sub", "/proc/nope/deeper"])
def test_bad_out_fails_at_once_in_one_line(out: str, tmp_path: Path, cli_env: dict) -> None:
    """Checked before the model is even read: the model path does not exist and is not the complaint."""
    (tmp_path / "afile").write_text("not a folder")
    res = _run(
        ["build", "missing.keras", "--data", str(DIGITS), "--target", "mobile", "--out", out],
        cli_env,
        tmp_path,
    )
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --out {out!r}"), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_out_folder_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PackageError, match="cannot be written"):
            check_output_dir(ro)
        with pytest.raises(PackageError, match="cannot be created"):
            check_output_dir(ro / "new")
    finally:
        ro.chmod(0o755)


def test_good_out_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # the folders it made to probe are gone again
    (tmp_path / "here").mkdir()
    check_output_dir(tmp_path / "here")
    assert list((tmp_path / "here").iterdir()) == []


def test_litert_note_is_dropped_and_other_stderr_kept(tmp_path: Path, cli_env: dict) -> None:
    """The XNNPACK line goes, anything else written to fd 2 meanwhile comes back out."""
    code = (
        "import os\n"
        "from device_agent.runtimes import litert\n"
        "with litert.quiet_delegate_note():\n"
        "    os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
        "    os.write(2, b'something else\\n')\n"
        "assert litert._note_seen\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=CLI_TIMEOUT_S
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == "something else\n"


@pytest.mark.slow
def test_evaluate_and_agent_print_no_xnnpack_note(
    digits_bundles: Path, tmp_path: Path, cli_env: dict
) -> None:
    res = _run(["evaluate", str(digits_bundles / "mobile"), "--data", str(DIGITS_TEST)], cli_env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "XNNPACK" not in res.stderr and "XNNPACK" not in res.stdout
    code = (
        "import numpy as np, sys\n"
        "from device_agent.agent import Agent\n"
        f"a = Agent({str(digits_bundles / 'raspberry-pi')!r}, allow_unsigned=True)\n"
        "print(a.predict(np.zeros((1, 8, 8, 1), np.float32)).labels[0])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=CLI_TIMEOUT_S
    )
    assert res.returncode == 0, res.stderr
    assert "XNNPACK" not in res.stderr and res.stdout.strip() in [str(i) for i in range(10)]
