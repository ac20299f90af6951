"""LiteRT's XNNPACK chatter stays out of what users see (issue 11, what to build 8), captured from the
real commands in subprocesses: build, evaluate, profile, and the agent's predict and bench. A model
XNNPACK refuses is reported in one clear line, by the build and by the agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"
EDGEFLEET = [sys.executable, "-c", "from toolchain.cli import main; main(prog_name='edgefleet')"]
AGENT = [sys.executable, "-m", "device_agent.cli"]
TIMEOUT_S = 600


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT_S)


def _quiet(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stderr[-2000:]
    for stream in (res.stdout, res.stderr):
        assert "XNNPACK" not in stream and "INFO:" not in stream, stream[-2000:]


def test_no_xnnpack_line_from_build_evaluate_profile_predict_bench(
    digits_cnn_path: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = dict(cli_env)
    env.pop("EDGEFLEET_DEBUG", None)
    build = _run(
        [*EDGEFLEET, "build", str(digits_cnn_path), "--data", str(DIGITS), "--eval-data", str(DIGITS_TEST),
         "--target", "mobile", "--out", "out"],
        env, tmp_path,
    )  # fmt: skip
    _quiet(build)
    bundle = tmp_path / "out" / "mobile"
    d = np.load(DIGITS_TEST)
    np.savez(tmp_path / "few.npz", x=d["x"][:30], y=d["y"][:30])
    _quiet(_run([*EDGEFLEET, "evaluate", str(bundle), "--data", "few.npz"], env, tmp_path))
    _quiet(
        _run(
            [*EDGEFLEET, "profile", str(bundle), "--on", "local", "--eval-data", "few.npz", "--runs", "20"],
            env,
            tmp_path,
        )
    )
    predict = _run(
        [*AGENT, "predict", "--bundle", str(bundle), "--input", "few.npz", "--json"], env, tmp_path
    )
    _quiet(predict)
    assert len(json.loads(predict.stdout)["predictions"]) == 30
    bench = _run([*AGENT, "bench", "--bundle", str(bundle), "--runs", "20", "--json"], env, tmp_path)
    _quiet(bench)
    assert json.loads(bench.stdout.strip().splitlines()[-1])["runtime"] == "litert"


# --------------------------------------------------------------------------------------------------
# A model XNNPACK refuses: a Dense layer on raw features of very different units, whose int8 output
# scale is thousands of times smaller than its input scale times its weight scale.


def _raw_features(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.c_[rng.uniform(0, 4000, n), rng.uniform(0.001, 0.01, n)].astype(np.float32)
    return x, (x[:, 1] < 0.0055).astype(np.int64)


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tf_keras as keras

    root = tmp_path_factory.mktemp("xnnpack refused")
    x, y = _raw_features()
    np.savez(root / "data.npz", x=x, y=y)
    model = keras.Sequential([keras.layers.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    kernel = np.zeros((2, 2), np.float32)
    kernel[1, 0] = 200.0  # the rate alone decides; pressure (0..4000) only widens the input range
    model.layers[-1].set_weights([kernel, np.array([-0.55, 0.55], np.float32)])
    model.save(root / "raw.keras")
    return root


def test_a_model_xnnpack_refuses_is_one_clear_line_in_the_build(
    refused: Path, cli_env: dict[str, str]
) -> None:
    res = _run(
        [*EDGEFLEET, "build", "raw.keras", "--data", "data.npz", "--target", "mobile", "--out", "out"],
        cli_env,
        refused,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: mobile: ") and "XNNPACK refuses node " in lines[0]
    assert (
        "Normalization layer" in lines[0] and "runtimeNode" not in lines[0] and "Traceback" not in res.stderr
    )


def test_a_model_xnnpack_refuses_is_one_clear_line_in_the_agent(
    refused: Path, cli_env: dict[str, str]
) -> None:
    """The device side says the same, for a bundle made around the int8 model by hand."""
    import tensorflow as tf

    from device_agent.formats.manifest import ModelFormat
    from device_agent.formats.stats import baseline_to_dict, build_baseline
    from toolchain.steps.artifact import read_io_specs
    from toolchain.steps.data import load_dataset
    from toolchain.steps.models import load_model
    from toolchain.steps.package import assemble_bundle

    ds = load_dataset(refused / "data.npz")
    lm = load_model(refused / "raw.keras")
    conv = tf.lite.TFLiteConverter.from_keras_model(lm.model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([ds.x[i : i + 1]] for i in range(200))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    model = refused / "raw.tflite"
    model.write_bytes(conv.convert())
    inputs, outputs = read_io_specs(model, ModelFormat.TFLITE)
    bundle = refused / "bundle"
    assemble_bundle(
        bundle,
        name="raw",
        version=1,
        target="mobile",
        model_file=model,
        model_format=ModelFormat.TFLITE,
        runtimes=["litert"],
        inputs=inputs,
        outputs=outputs,
        labels=["high", "low"],
        baseline=baseline_to_dict(build_baseline(ds.x, lm.predict(ds.x), ["high", "low"])),
        threads=1,
    )
    res = _run([*AGENT, "predict", "--bundle", str(bundle), "--input", "data.npz"], cli_env, refused)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("warning: no --trusted-key")]
    assert len(lines) == 1 and "XNNPACK refuses node " in lines[0] and "model.tflite" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and "runtimeNode" not in res.stderr
