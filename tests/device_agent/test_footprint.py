"""The agent runs without TensorFlow (and without the host stack): import guards and a clean venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from tests.device_agent.agent_bundles import cached_onnx_bundle, cached_tflite_bundle, digits

REPO = Path(__file__).resolve().parents[2]

# A meta path finder that makes the host stack unimportable, then runs the CLI.
BLOCKER = """
import sys
BLOCKED = {"tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "tf2onnx", "toolchain",
           "amqtt"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=120,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("in") / "x.npz"
    d = digits()
    np.savez(p, x=d["x_test"][:50], y=d["y_test"][:50])
    return p


@pytest.mark.timeout(120)
def test_import_and_help_stay_light() -> None:
    code = (
        "import device_agent, device_agent.cli\n"
        "heavy = {'onnxruntime', 'openvino', 'ai_edge_litert', 'paho', 'sqlite3'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(device_agent.cli.main, ['--help'])\n"
        "assert r.exit_code == 0\n"
        "heavy = {'onnxruntime', 'openvino', 'ai_edge_litert', 'paho'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    r = run_blocked(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.timeout(120)
def test_offline_predict_and_daemon_without_tensorflow(tmp_path: Path, inputs: Path) -> None:
    code = (
        "from device_agent.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'tensorflow' not in sys.modules and 'toolchain' not in sys.modules\n"
    )
    r = run_blocked(
        code,
        "predict",
        "--bundle",
        str(cached_onnx_bundle()),
        "--input",
        str(inputs),
        "--json",
        "--label",
        "y",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] > 0.85
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\ndevice_id = "d1"\nfleet = "f"\nbundle = "{cached_onnx_bundle()}"\n'
        f'state_dir = "{tmp_path}/s"\n'
        'allow_unsigned = true\n[api]\nlisten = "127.0.0.1:0"\n'
    )
    daemon = (
        "from device_agent.daemon import Daemon\n"
        f"d = Daemon.from_file({str(cfg)!r}).start()\n"
        "import numpy as np\n"
        "d.agent.predict(np.zeros((2, 8, 8, 1), dtype=np.float32))\n"
        "d.stop()\n"
        "assert d.windows_written == 1\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok')\n"
    )
    r = run_blocked(daemon)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clean_venv_with_only_device_dependencies(tmp_path: Path, inputs: Path) -> None:
    """``pip install`` of the device dependencies alone (no TensorFlow) runs an int8 LiteRT bundle."""
    from tests.conftest import missing_service

    bundle = cached_tflite_bundle()
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pip = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "ai-edge-litert",
            "paho-mqtt>=2,<3",
            "numpy",
            "click",
            "cryptography",
        ],
        capture_output=True,
        text=True,
        timeout=800,
    )
    if pip.returncode != 0:
        missing_service(f"PyPI for a clean venv ({pip.stderr.strip().splitlines()[-1:]})")
    probe = subprocess.run([str(py), "-c", "import tensorflow"], capture_output=True, text=True)
    assert probe.returncode != 0  # really no TensorFlow in there
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [
            str(py),
            "-m",
            "device_agent.cli",
            "predict",
            "--bundle",
            str(bundle),
            "--input",
            str(inputs),
            "--label",
            "y",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"]["runtime"] == "litert" and doc["accuracy"] > 0.85
