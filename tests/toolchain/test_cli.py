"""`edgefleet train|build|evaluate|report` from the command line: results, --json, and every bad input.

Bad inputs exit 1 with one `Error: ...` line naming the value and the fix, no traceback (unless
--debug), and leave no bundle (half-written or otherwise) behind. Bad flags exit 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.formats.manifest import load_manifest
from toolchain.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"
# The real entry point, as the console script runs it.
EDGEFLEET = [sys.executable, "-c", "from toolchain.cli import main; main(prog_name='edgefleet')"]


def run(*args: object) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def assert_bad_input(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def no_bundles(out: Path) -> bool:
    return not out.exists() or not any(
        (p / "manifest.json").exists() or p.name.startswith(".") for p in out.iterdir()
    )


def build(model: Path, out: Path, *extra: object, data: object = DIGITS) -> tuple[int, str, str]:
    return run("build", model, "--data", data, "--target", "mobile", "--out", out, *extra)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_model(digits_cnn_path: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "model.keras"
    raw = digits_cnn_path.read_bytes()
    bad.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else bytes(reversed(raw)))
    code, _, err = build(bad, tmp_path / "out")
    assert_bad_input(code, err, str(bad), "re-save")
    assert no_bundles(tmp_path / "out")


def test_unknown_target(digits_cnn_path: Path, tmp_path: Path) -> None:
    code, _, err = run("build", digits_cnn_path, "--data", DIGITS, "--target", "rpi", "--out", tmp_path / "o")
    assert_bad_input(code, err, "unknown target 'rpi'", "raspberry-pi", "edgefleet targets list")
    assert no_bundles(tmp_path / "o")


def test_data_shape_does_not_fit_the_model(digits_cnn_path: Path, tmp_path: Path) -> None:
    p = tmp_path / "small.npz"
    np.savez(p, x=np.zeros((50, 4, 4, 1), np.float32), y=np.arange(50) % 10)
    code, _, err = build(digits_cnn_path, tmp_path / "o", data=p)
    assert_bad_input(code, err, "shape (4, 4, 1)", "model takes (8, 8, 1)")
    assert no_bundles(tmp_path / "o")


def test_nan_calibration_data(digits_cnn_path: Path, tmp_path: Path, digits: dict) -> None:
    x = digits["x"][:100].copy()
    x[42, 3, 3, 0] = np.nan
    x[50, 0, 0, 0] = np.inf
    p = tmp_path / "nan.npz"
    np.savez(p, x=x, y=digits["y"][:100])
    code, _, err = build(digits_cnn_path, tmp_path / "o", data=p)
    assert_bad_input(code, err, "NaN or infinite", "sample 42", "nan.npz")
    assert no_bundles(tmp_path / "o")


def test_missing_label_column(digits_cnn_path: Path, tmp_path: Path, digits: dict) -> None:
    p = tmp_path / "digits.csv"
    flat = digits["x"][:30].reshape(30, -1)
    header = ",".join(f"px{i}" for i in range(64)) + ",digit"
    p.write_text(
        header
        + "\n"
        + "".join(",".join(map(str, r)) + f",{c}\n" for r, c in zip(flat, digits["y"][:30], strict=True))
    )
    code, _, err = build(digits_cnn_path, tmp_path / "o", "--label", "class", data=p)
    assert_bad_input(code, err, "label column 'class' is not in", "digit")
    code, _, err = build(digits_cnn_path, tmp_path / "o", data=p)
    assert_bad_input(code, err, "needs --label COLUMN")


def test_too_few_calibration_samples(digits_cnn_path: Path, tmp_path: Path, digits: dict) -> None:
    p = tmp_path / "few.npz"
    np.savez(p, x=digits["x"][:12], y=digits["y"][:12])
    code, _, err = build(digits_cnn_path, tmp_path / "o", "--eval-data", DIGITS_TEST, data=p)
    assert_bad_input(code, err, "has 12 samples", "need at least 20", "--data")
    assert no_bundles(tmp_path / "o")


def test_output_folder_holding_a_different_bundle(
    digits_bundles: Path, digits_cnn_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    shutil.copytree(digits_bundles / "mobile", out / "mobile")
    before = {p.name: p.read_bytes() for p in (out / "mobile").iterdir()}
    code, _, err = build(digits_cnn_path, out, "--name", "other-model")
    assert_bad_input(code, err, "holds bundle 'digits_cnn'", "not 'other-model'", "another --out")
    code, _, err = build(
        digits_cnn_path, out, "--eval-data", DIGITS_TEST, "--prune", "0.5", "--allow-accuracy-drop"
    )
    assert code == 1 and "holds a different 'digits_cnn' version 1" in err and "--version 2" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (out / "mobile").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_missing_model_and_data_files(digits_cnn_path: Path, tmp_path: Path) -> None:
    code, _, err = build(tmp_path / "nope.keras", tmp_path / "o")
    assert_bad_input(code, err, "nope.keras", "does not exist")
    code, _, err = build(digits_cnn_path, tmp_path / "o", data=tmp_path / "nope.npz")
    assert_bad_input(code, err, "nope.npz", "does not exist")


@pytest.mark.parametrize(
    "flags",
    [
        ["--quantize", "int4"],
        ["--prune", "0"],
        ["--prune", "1.5"],
        ["--version", "0"],
        ["--version", "two"],
    ],
)
def test_bad_flags_exit_2(digits_cnn_path: Path, tmp_path: Path, flags: list[str]) -> None:
    code, _, err = build(digits_cnn_path, tmp_path / "o", *flags)
    assert code == 2 and "Traceback" not in err
    assert no_bundles(tmp_path / "o")


def test_missing_required_flag_exits_2(digits_cnn_path: Path) -> None:
    code, _, err = run("build", digits_cnn_path, "--target", "mobile")
    assert code == 2 and "--data" in err


# ---------------------------------------------------------------------------------------------- results


def test_build_json_prints_only_the_report_on_stdout(
    digits_cnn_path: Path, tmp_path: Path, cli_env: dict
) -> None:
    out = tmp_path / "o"
    res = subprocess.run(
        [
            *EDGEFLEET,
            "build",
            str(digits_cnn_path),
            "--data",
            str(DIGITS),
            "--eval-data",
            str(DIGITS_TEST),
            "--target",
            "raspberry-pi",
            "--out",
            str(out),
            "--json",
            "--allow-accuracy-drop",
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert doc["targets"]["raspberry-pi"]["status"] == "ok"
    assert doc == json.loads((out / "report.json").read_text())


def test_subprocess_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path, cli_env: dict) -> None:
    base = EDGEFLEET
    args = ["build", "m.keras", "--data", str(DIGITS), "--target", "rpi"]
    res = subprocess.run(base + args, capture_output=True, text=True, env=cli_env, timeout=120, cwd=tmp_path)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines()[-1].startswith("Error: unknown target 'rpi'")
    assert "Traceback" not in res.stderr
    res = subprocess.run(
        base + ["--debug"] + args, capture_output=True, text=True, env=cli_env, timeout=120, cwd=tmp_path
    )
    assert res.returncode != 0 and "Traceback" in res.stderr and "TargetError" in res.stderr


def test_train_then_build_then_evaluate_then_report(tmp_path: Path, digits_bundles: Path) -> None:
    model = tmp_path / "m.keras"
    code, out, err = run(
        "train", "--data", DIGITS, "--arch", "cnn", "--epochs", "2", "--out", model, "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == str(model) and model.is_file() and doc["classes"] == [str(i) for i in range(10)]

    code, out, err = run("evaluate", digits_bundles / "x86", "--data", DIGITS_TEST, "--json")
    assert code == 0, err
    ev = json.loads(out)
    report = json.loads((digits_bundles / "report.json").read_text())
    assert ev["accuracy"] == pytest.approx(
        report["targets"]["x86"]["per_runtime"][ev["preferred_runtime"]]["accuracy"]
    )
    assert set(ev["per_runtime"]) == {"onnxruntime", "openvino"}
    assert ev["latency_ms_p50"] > 0 and ev["samples"] == 359

    code, out, err = run("evaluate", digits_bundles / "mobile", "--data", DIGITS_TEST)
    assert code == 0 and "litert" in out and "accuracy" in out

    p = tmp_path / "wrong.npz"
    np.savez(p, x=np.zeros((30, 64), np.float32), y=np.arange(30) % 10)
    code, _, err = run("evaluate", digits_bundles / "mobile", "--data", p)
    assert_bad_input(code, err, "shape (64,)", "(8, 8, 1)")

    copy = tmp_path / "rep"
    shutil.copytree(digits_bundles, copy)
    (copy / "report.html").unlink()
    code, out, err = run("report", copy)
    assert code == 0 and (copy / "report.html").is_file()
    assert all(t in out for t in ("coral", "mobile", "raspberry-pi", "x86"))
    code, out, _ = run("report", copy, "--json")
    assert json.loads(out)["name"] == "digits_cnn"
    code, _, err = run("report", tmp_path / "empty-dir")
    assert_bad_input(code, err, "no report.json")


def test_build_table_on_the_terminal(digits_cnn_path: Path, tmp_path: Path) -> None:
    code, out, err = build(
        digits_cnn_path, tmp_path / "o", "--eval-data", DIGITS_TEST, "--allow-accuracy-drop"
    )
    assert code == 0, err
    first = out.splitlines()[0].split()
    assert first[:3] == ["target", "status", "accuracy"]
    assert any(line.startswith("mobile") and " ok " in line for line in out.splitlines())
    assert load_manifest(tmp_path / "o" / "mobile").target == "mobile"


def test_bad_sign_key_fails_before_any_work(digits_cnn_path: Path, tmp_path: Path) -> None:
    code, _, err = build(digits_cnn_path, tmp_path / "o", "--sign-key", tmp_path / "missing.key")
    assert_bad_input(code, err, "missing.key", "edgefleet keys create")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    code, _, err = build(digits_cnn_path, tmp_path / "o", "--sign-key", junk)
    assert code == 1 and "junk.key" in err and "Traceback" not in err
    assert no_bundles(tmp_path / "o")
