"""The device side never imports TensorFlow; `edgefleet --help` starts without it; extras stay apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "tf2onnx")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_importing_every_device_agent_module_leaves_tensorflow_out() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import device_agent\n"
        "mods = [m.name for m in pkgutil.walk_packages(device_agent.__path__, 'device_agent.')]\n"
        "failed = []\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        failed.append((m, str(e)))\n"
        f"heavy = [h for h in {HEAVY!r} if h in sys.modules]\n"
        "print(len(mods), heavy, failed)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stdout + res.stderr
    n = int(res.stdout.split()[0])
    assert n >= 5  # bundle, stats, telemetry, inference, runtimes...


def test_edgefleet_help_does_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "from toolchain.cli import main\n"
        "try:\n"
        "    main(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "for cmd in (['build', '--help'], ['train', '--help'], ['targets', 'list']):\n"
        "    try:\n"
        "        main(cmd, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"heavy = [h for h in {HEAVY!r} if h in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "build" in res.stdout and "targets" in res.stdout


def test_device_extra_does_not_pull_tensorflow() -> None:
    import tomllib

    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = doc["project"]["optional-dependencies"]
    core = " ".join(doc["project"]["dependencies"]).lower()
    device = " ".join(extras["device"]).lower()
    assert "tensorflow" not in core and "tensorflow" not in device and "keras" not in device
    assert any(d.startswith("tensorflow==") for d in extras["host"])
