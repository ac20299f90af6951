"""The installed wheel carries what `edgefleet demo` and the fleet simulator load (issue 13, item 6).

Builds the wheel as pip does (build isolation: setuptools and numpy >= 2 from the index), installs it
into a folder outside the checkout, and imports it from there in a child process whose working
directory is elsewhere, so nothing can come from the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from toolchain.data import DIGITS_TEST, DIGITS_TRAIN, digits_path

REPO = Path(__file__).resolve().parents[2]
OFFLINE_HINTS = (
    "Could not find a version",
    "No matching distribution",
    "Failed to establish",
    "NewConnectionError",
)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_package_digits_equal_the_calibration_data_files() -> None:
    """The package's copy (toolchain/data) and the users' copy (calibration_data/) are the same files."""
    for name in (DIGITS_TRAIN, DIGITS_TEST):
        assert _sha(digits_path(name)) == _sha(REPO / "calibration_data" / name), name
    with pytest.raises(ValueError, match="unknown shipped data file"):
        digits_path("iris.npz")


def test_demo_and_simulator_data_load_from_an_installed_wheel(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--quiet", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(tmp_path),
    )
    if res.returncode != 0 and any(h in res.stderr for h in OFFLINE_HINTS):
        pytest.skip(f"pip could not fetch the build requirements (offline?): {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = wheels.glob("edgefleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "toolchain/data/digits.npz",
        "toolchain/data/digits_test.npz",
        "toolchain/data/__init__.py",
    } <= names
    assert any(n.startswith("device_agent/_kernels") and n.endswith(".so") for n in names), "C kernels built"
    assert not any(n.startswith("calibration_data/") or n.startswith("tests/") for n in names)

    site = tmp_path / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import json, toolchain, device_agent.kernels as k\n"
        "from toolchain import demo\n"
        "from toolchain.fleet import sim\n"
        "d = sim.load_digits()\n"
        "print(json.dumps({'toolchain': toolchain.__file__, 'train': str(demo.DIGITS_TRAIN),\n"
        "    'test': str(demo.DIGITS_TEST), 'native': k.NATIVE,\n"
        "    'shapes': [list(d['x'].shape), list(d['x_test'].shape)], 'sum': float(d['x'].sum())}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(elsewhere), env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("toolchain", "train", "test"):
        assert Path(got[key]).is_relative_to(site), (key, got[key])
    assert Path(got["train"]).name == DIGITS_TRAIN and Path(got["test"]).name == DIGITS_TEST
    assert got["shapes"] == [[1438, 8, 8, 1], [359, 8, 8, 1]]
    assert got["sum"] == float(
        np.load(REPO / "calibration_data" / DIGITS_TRAIN)["x"].astype(np.float64).sum()
    )
    assert got["native"] is True  # the wheel's own C kernels, built against numpy's C API
