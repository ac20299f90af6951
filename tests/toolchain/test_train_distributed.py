"""``edgefleet train --workers N``: MultiWorkerMirroredStrategy across local worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolchain.steps.distributed import free_ports, tf_config

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "calibration_data"
EPOCHS = "5"


def test_tf_config_names_every_worker_and_its_index() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    hosts = [f"127.0.0.1:{p}" for p in ports]
    doc = json.loads(tf_config(hosts, 2))
    assert doc == {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 2}}


def _train(out: Path, workers: int, env: dict[str, str]) -> dict:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "toolchain.cli",
            "train",
            "--data",
            str(DIGITS / "digits.npz"),
            "--arch",
            "cnn",
        ]
        + ["--epochs", EPOCHS, "--workers", str(workers), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"},
        timeout=900,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow
def test_two_local_workers_match_one_worker(tmp_path: Path, cli_env: dict[str, str]) -> None:
    from toolchain.steps.models import load_model, read_model_meta

    one = _train(tmp_path / "one.keras", 1, cli_env)
    two = _train(tmp_path / "two.keras", 2, cli_env)
    assert one["workers"] == 1 and two["workers"] == 2 and two["epochs_run"] == int(EPOCHS)
    meta = read_model_meta(tmp_path / "two.keras")
    assert meta is not None
    # MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy in TensorFlow
    assert meta["training"]["distribution"] == {"strategy": "CollectiveAllReduceStrategy", "replicas": 2}
    test = np.load(DIGITS / "digits_test.npz")
    acc = {}
    for name in ("one", "two"):
        model = load_model(tmp_path / f"{name}.keras")
        acc[name] = float(np.mean(model.predict(test["x"]).argmax(1) == test["y"]))
    assert acc["one"] > 0.8
    assert abs(acc["two"] - acc["one"]) <= 0.03, acc  # the same global batch: about the same model
    assert not list(tmp_path.glob("worker-*"))  # the other workers' copies stay in the scratch folder
