"""``edgefleet-agent``: predict (npy/npz/csv, --label, --json, --output), check (0/78), run (78)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.cli import main
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits
from tests.device_agent.agent_helpers import write_config

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def predict(*args: str) -> tuple[int, str, str]:
    """``edgefleet-agent predict --bundle <the cached ONNX bundle> ARGS``."""
    return run("predict", "--bundle", str(cached_onnx_bundle()), *args)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = digits()
    root = tmp_path_factory.mktemp("inputs")
    x, y = d["x_test"][:60], d["y_test"][:60]
    np.savez(root / "test.npz", x=x, y=y)
    np.save(root / "test.npy", x)
    header = ",".join([f"px{i}" for i in range(64)] + ["digit"])
    rows = [",".join([*map(str, s.reshape(-1).tolist()), str(t)]) for s, t in zip(x, y, strict=True)]
    (root / "test.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return {"npz": root / "test.npz", "npy": root / "test.npy", "csv": root / "test.csv"}


def test_predict_npz_with_labels_reports_accuracy(files: dict[str, Path]) -> None:
    code, out, err = predict("--input", str(files["npz"]), "--label", "y")
    assert code == 0, err
    assert "digits-dense v1 (onnxruntime), 60 inputs" in out
    acc = float(out.strip().splitlines()[-1].split()[1])
    assert acc > 0.85
    assert "signature is not checked" in err


def test_predict_csv_and_npy_agree_and_json(files: dict[str, Path]) -> None:
    code, out, _ = predict("--input", str(files["csv"]), "--label", "digit", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["count"] == 60 and doc["accuracy"] > 0.85 and doc["model"]["runtime"] == "onnxruntime"
    code, out2, _ = predict("--input", str(files["npy"]), "--json")
    assert code == 0
    labels_npy = [p["label"] for p in json.loads(out2)["predictions"]]
    assert labels_npy == [p["label"] for p in doc["predictions"]]


@pytest.mark.parametrize("suffix", ["csv", "json", "npy"])
def test_predict_output_file(files: dict[str, Path], tmp_path: Path, suffix: str) -> None:
    out_path = tmp_path / f"pred.{suffix}"
    code, out, _ = predict("--input", str(files["npz"]), "--output", str(out_path))
    assert code == 0 and f"wrote {out_path}" in out
    if suffix == "csv":
        lines = out_path.read_text().splitlines()
        assert lines[0].startswith("label,score,score_0") and len(lines) == 61
    elif suffix == "json":
        assert len(json.loads(out_path.read_text())["predictions"]) == 60
    else:
        assert np.load(out_path).shape == (60, 10)


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--input", "missing.npz"], "does not exist"),
        (["--input", "{npz}", "--label", "nope"], "--label 'nope' is not an array"),
        (["--input", "{npy}", "--label", "y"], "an .npy holds inputs only"),
        (["--input", "{bad}"], "use a .npy, .npz"),
        (["--input", "{short}"], "does not fit the model"),
    ],
)
def test_predict_bad_input_exits_1_with_one_line(
    files: dict[str, Path], tmp_path: Path, args: list[str], msg: str
):
    (tmp_path / "x.txt").write_text("1,2")
    np.save(tmp_path / "short.npy", np.zeros((3, 5), dtype=np.float32))
    subs = {
        "npz": files["npz"],
        "npy": files["npy"],
        "bad": tmp_path / "x.txt",
        "short": tmp_path / "short.npy",
    }
    args = [a.format(**subs) for a in args]
    code, out, err = predict(*args)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: ") and msg in last


def test_predict_bad_bundle_and_bad_flags(files: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("predict", "--bundle", str(tmp_path), "--input", str(files["npz"]))
    assert code == 1 and "no manifest.json" in err
    code, _, err = predict("--input", str(files["npz"]), "--runtime", "tensorflow")
    assert code == 2
    code, _, _ = run("predict", "--input", str(files["npz"]))
    assert code == 2


def test_check_ok_and_json(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "agent.toml",
        bundle=cached_onnx_bundle(),
        state_dir=tmp_path / "state",
        url="mqtt://127.0.0.1:1",
    )
    code, out, err = run("check", "--config", str(cfg))
    assert code == 0, err
    assert out.startswith("OK: lab/pi-001 serves digits-dense v1 with onnxruntime") and "UNSIGNED" in out
    code, out, _ = run("check", "--config", str(cfg), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["model"]["version"] == 1 and doc["mqtt"] == "mqtt://127.0.0.1:1"


@pytest.mark.parametrize(
    ("mutate", "msg"),
    [
        (lambda t: t + "\n[extra]\n", "unknown config section"),
        (lambda t: t.replace("allow_unsigned = true", "allow_unsigned = true\ncolour = 1"), "colour"),
        (lambda t: t.replace('bundle = "', 'bundle = "/nonexistent'), "is not a directory"),
        (lambda t: t.replace("allow_unsigned = true", "allow_unsigned = false"), "trusted_keys is empty"),
    ],
)
def test_check_and_run_exit_78_on_bad_config(tmp_path: Path, mutate, msg: str) -> None:
    cfg = write_config(tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state")
    cfg.write_text(mutate(cfg.read_text()))
    code, _, err = run("check", "--config", str(cfg))
    assert code == 78 and msg in err and err.startswith("Error: ")
    code, out, _ = run("check", "--config", str(cfg), "--json")
    assert code == 78 and msg in json.loads(out)["error"]
    code, _, err = run("run", "--config", str(cfg))
    assert code == 78 and msg in err


@pytest.mark.timeout(60)
def test_installed_entry_point_help_and_run_78(tmp_path: Path) -> None:
    """The real console script: --help lists the commands; run fails fast with 78 on a missing config."""
    exe = Path(sys.executable).parent / "edgefleet-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "device_agent.cli"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in ("predict", "run", "check"))
    r = subprocess.run(
        [*cmd, "run", "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 78 and r.stderr.strip().startswith("Error: config file")
