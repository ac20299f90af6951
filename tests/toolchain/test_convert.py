"""Conversion for every target, checked in the real runtimes (LiteRT, ONNX Runtime, OpenVINO).

One tiny tf_keras CNN (8x8x1 -> Conv -> Dense 10) trained on the shipped digits is converted once per
target for the whole session; the tests then look at what the runtimes report about the files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.formats.manifest import DType, ModelFormat
from toolchain.steps import convert as conv
from toolchain.steps.convert import (
    Artifact,
    ConversionError,
    VerificationError,
    convert_float,
    convert_for_target,
    read_io_specs,
)
from toolchain.steps.verify import SQNR_CAP_DB, predict_artifact, sqnr_db, top1_agreement, verify_artifact
from toolchain.targets import load_target

TARGETS = ["mobile", "raspberry-pi", "coral", "x86"]
N_VERIFY = 200
DATA = Path(__file__).resolve().parents[2] / "calibration_data"
MIN_AGREEMENT = 0.9


# --------------------------------------------------------------------------------------------------
# Fast unit tests (no TensorFlow)


def test_top1_agreement_and_sqnr() -> None:
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    approx = np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], dtype=np.float32)
    assert top1_agreement(approx, ref) == pytest.approx(2 / 3)
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    noise = float(np.sum((ref.astype(np.float64) - approx) ** 2))
    assert sqnr_db(ref, approx) == pytest.approx(10 * np.log10(signal / noise), rel=1e-5)
    assert sqnr_db(ref, ref) == SQNR_CAP_DB  # identical outputs: capped, JSON-safe


def test_too_few_calibration_samples_is_a_clear_error() -> None:
    with pytest.raises(ConversionError) as e:
        conv.check_calibration(np.zeros((7, 8, 8, 1), np.float32))
    assert str(e.value) == "calibration data has 7 samples; need at least 20 (--data)"


def test_nan_or_inf_calibration_data_is_a_clear_error() -> None:
    x = np.ones((40, 8, 8, 1), np.float32)
    x[3, 0, 0, 0] = np.nan
    x[9, 1, 1, 0] = np.inf
    with pytest.raises(ConversionError, match=r"NaN or infinite values in 2 of 40 samples \(first: row 3\)"):
        conv.check_calibration(x)


def test_calibration_is_subsampled_reproducibly() -> None:
    x = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    a, b = conv.check_calibration(x), conv.check_calibration(x)
    assert a.shape == (conv.CALIBRATION_SAMPLES, 4)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a[:, 0])) == conv.CALIBRATION_SAMPLES  # no sample twice


def test_non_numeric_calibration_data_is_refused() -> None:
    with pytest.raises(ConversionError, match="must be numeric"):
        conv.check_calibration(np.array([["a"] * 3] * 30))


# --------------------------------------------------------------------------------------------------
# Session fixtures: one tiny model, converted once per target


def _tiny_model(k: Any, rescale: bool = True) -> Any:
    layers = [k.layers.Input((8, 8, 1))]
    if rescale:
        layers.append(k.layers.Rescaling(1 / 16.0))
    layers += [
        k.layers.Conv2D(8, 3, activation="relu"),
        k.layers.Flatten(),
        k.layers.Dense(10, activation="softmax"),
    ]
    return k.Sequential(layers)


@pytest.fixture(scope="session")
def keras_model(digits: dict[str, np.ndarray]) -> Any:
    from toolchain.tfenv import import_keras, import_tf

    k = import_keras()
    import_tf().random.set_seed(0)
    m = _tiny_model(k)
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(digits["x"], digits["y"], epochs=3, batch_size=32, verbose=0)
    return m


@pytest.fixture(scope="session")
def float_scores(keras_model: Any, digits: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(keras_model.predict(digits["x_test"][:N_VERIFY], verbose=0))


@pytest.fixture(scope="session")
def artifacts(
    keras_model: Any, digits: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Artifact]:
    out = tmp_path_factory.mktemp("convert")
    return {
        # progress=True for one target runs the tqdm path (quiet here: stderr is not a terminal)
        t: convert_for_target(keras_model, load_target(t), digits["x"], out / t, progress=t == "mobile")
        for t in TARGETS
    }


@pytest.fixture(scope="session")
def verified(
    artifacts: dict[str, Artifact], digits: dict[str, np.ndarray], float_scores: np.ndarray
) -> dict[str, dict[str, Any]]:
    x = digits["x_test"][:N_VERIFY]
    return {t: verify_artifact(a, load_target(t), x, float_scores) for t, a in artifacts.items()}


# --------------------------------------------------------------------------------------------------
# PTQ for every target


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_boundary_dtypes_are_what_the_profile_promises(name: str, artifacts: dict[str, Artifact]) -> None:
    from device_agent.runtimes import load_runtime_model

    target, art = load_target(name), artifacts[name]
    assert art.path.name == ("model.onnx" if name == "x86" else "model.tflite")
    assert art.size_bytes == art.path.stat().st_size > 0
    assert art.inputs[0].dtype == target.quantization.input_dtype
    assert art.outputs[0].dtype == target.quantization.output_dtype
    for spec in (art.inputs[0], art.outputs[0]):
        assert (spec.quantization is not None) == (spec.dtype in (DType.INT8, DType.UINT8))
    # ...and each runtime that will run it reports the same dtypes.
    for rt in art.runtimes:
        m = load_runtime_model(art.path, rt)
        assert np.dtype(m.input_dtype).name == target.quantization.input_dtype.value
        assert np.dtype(m.output_dtype).name == target.quantization.output_dtype.value


@pytest.mark.slow
@pytest.mark.parametrize("name", ["raspberry-pi", "coral"])
def test_full_int8_targets_hold_no_float_tensor(name: str, artifacts: dict[str, Artifact]) -> None:
    from device_agent.runtimes import load_runtime_model

    art = artifacts[name]
    m: Any = load_runtime_model(art.path, "litert")
    float_tensors = [t["name"] for t in m.tensors() if np.dtype(t["dtype"]).kind == "f"]
    assert float_tensors == []
    assert art.checks["float_ops"] == [] and art.checks["weights_int8"]
    assert "DEQUANTIZE" not in art.checks["ops"]


@pytest.mark.slow
def test_mobile_keeps_only_boundary_ops_float(artifacts: dict[str, Artifact]) -> None:
    from device_agent.runtimes import load_runtime_model

    art = artifacts["mobile"]
    m: Any = load_runtime_model(art.path, "litert")
    tensors = {t["index"]: t for t in m.tensors()}
    float_ops = sorted(
        op["op_name"]
        for op in m.ops()
        if op["op_name"] != "DELEGATE"
        and any(np.dtype(tensors[i]["dtype"]).kind == "f" for i in [*op["inputs"], *op["outputs"]] if i >= 0)
    )
    assert float_ops == ["DEQUANTIZE", "QUANTIZE"]
    assert sorted(art.checks["boundary_ops"]) == ["DEQUANTIZE", "QUANTIZE"]
    assert art.checks["ops"]["CONV_2D"] == 1 and art.checks["weights_int8"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_artifact_agrees_with_the_float_model(name: str, verified: dict[str, dict[str, Any]]) -> None:
    r = verified[name]
    assert r["samples"] == N_VERIFY
    assert r["float_ops"] == []
    assert r["top1_agreement"] >= MIN_AGREEMENT
    assert (
        r["sqnr_db"] > 15.0
    )  # int8 of a softmax output is typically 25-50 dB; float noise would be far lower
    for v in r["per_runtime"].values():
        assert v["top1_agreement"] >= MIN_AGREEMENT


@pytest.mark.slow
def test_x86_is_checked_int8_qdq_and_runs_in_onnxruntime_and_openvino(
    artifacts: dict[str, Artifact], verified: dict[str, dict[str, Any]]
) -> None:
    import onnx

    art = artifacts["x86"]
    onnx.checker.check_model(str(art.path), full_check=True)
    assert sorted(art.runtimes) == ["onnxruntime", "openvino"]
    assert sorted(verified["x86"]["per_runtime"]) == ["onnxruntime", "openvino"]
    assert art.checks["weights_int8"] and set(art.checks["activation_dtypes"]) == {"int8"}
    assert art.checks["ops"]["QuantizeLinear"] >= 2 and art.checks["ops"]["DequantizeLinear"] >= 2
    # preferred runtime first: ordered by the measured latency at the profile's thread count
    p50 = [art.latency[rt]["threads_N"]["p50_ms"] for rt in art.runtimes]
    assert p50 == sorted(p50)


@pytest.mark.slow
def test_coral_has_a_static_batch_1_input_and_still_runs_batches(
    artifacts: dict[str, Artifact], digits: dict[str, np.ndarray], float_scores: np.ndarray
) -> None:
    art = artifacts["coral"]
    assert art.inputs[0].shape == (1, 8, 8, 1)
    assert art.outputs[0].shape == (1, 10)
    assert art.checks["static_shape"] is True
    scores = predict_artifact(art, "litert", digits["x_test"][:30])  # run sample by sample
    assert scores.shape == (30, 10)
    assert top1_agreement(scores, float_scores[:30]) >= MIN_AGREEMENT
    assert artifacts["raspberry-pi"].inputs[0].shape[0] == -1  # other targets keep a dynamic batch


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_latency_is_measured_per_runtime_and_thread_count(name: str, artifacts: dict[str, Artifact]) -> None:
    from toolchain.steps.latency import LATENCY_REPEATS

    art, target = artifacts[name], load_target(name)
    assert set(art.latency) == set(art.runtimes)
    for lat in art.latency.values():
        assert lat["threads_1"]["threads"] == 1
        assert lat["threads_N"]["threads"] == target.threads
        for m in (lat["threads_1"], lat["threads_N"]):
            assert 0 < m["p50_ms"] <= m["p95_ms"]
            assert m["runs"] == LATENCY_REPEATS


@pytest.mark.slow
def test_measure_latency_on_a_bare_file(
    artifacts: dict[str, Artifact], digits: dict[str, np.ndarray]
) -> None:
    from toolchain.steps.latency import measure_latency

    m = measure_latency(artifacts["raspberry-pi"].path, "litert", digits["x"][0], threads=2, repeats=15)
    assert m["runs"] == 15 and m["threads"] == 2 and 0 < m["p50_ms"] <= m["p95_ms"]


@pytest.mark.slow
def test_calibration_sample_shape_must_fit_the_model(keras_model: Any, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"sample shape \(4, 4\); the model takes \(8x8x1\)"):
        convert_for_target(keras_model, load_target("mobile"), np.zeros((30, 4, 4), np.float32), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobile", "x86"])
def test_a_free_spatial_axis_is_refused_for_every_back_end(name: str, tmp_path: Path) -> None:
    from toolchain.tfenv import import_keras

    keras = import_keras()
    inp = keras.Input(shape=(None, 3))  # a sequence of any length: no fixed sample shape to quantize for
    pooled = keras.layers.GlobalAveragePooling1D()(inp)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(pooled))
    x = np.random.default_rng(0).uniform(0.0, 1.0, (40, 5, 3)).astype(np.float32)
    with pytest.raises(
        ConversionError, match=r"unknown dimensions besides the batch; give it a fixed input shape"
    ):
        convert_for_target(model, load_target(name), x, tmp_path, progress=False)
    assert not list(tmp_path.glob("model.*"))


@pytest.mark.slow
def test_a_folder_that_is_not_a_savedmodel_is_a_clear_error(
    digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    with pytest.raises(ConversionError, match="is not a SavedModel directory"):
        convert_for_target(tmp_path, load_target("raspberry-pi"), digits["x"], tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobile", "x86"])
def test_qat_flag_on_a_plain_model_is_a_clear_error(
    name: str, keras_model: Any, digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    with pytest.raises(
        ConversionError, match="--quantize qat was asked for, but the model has no FakeQuant nodes"
    ):
        convert_for_target(keras_model, load_target(name), digits["x"], tmp_path, qat=True, progress=False)
    assert not list(tmp_path.glob("model.*"))


@pytest.mark.slow
def test_a_damaged_savedmodel_is_a_clear_error(digits: dict[str, np.ndarray], tmp_path: Path) -> None:
    sm = tmp_path / "sm"
    sm.mkdir()
    (sm / "saved_model.pb").write_bytes(b"\x08\x01 this is not a protobuf" * 10)
    with pytest.raises(ConversionError) as e:
        convert_for_target(sm, load_target("x86"), digits["x"], tmp_path / "out", progress=False)
    assert str(e.value).startswith(f"cannot load SavedModel {str(sm)!r}") and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# Float references


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [ModelFormat.TFLITE, ModelFormat.ONNX])
def test_float_reference_matches_keras(
    fmt: ModelFormat,
    keras_model: Any,
    digits: dict[str, np.ndarray],
    float_scores: np.ndarray,
    tmp_path: Path,
) -> None:
    path = convert_float(keras_model, fmt, tmp_path / f"float.{fmt.value}")
    inputs, outputs = read_io_specs(path, fmt)
    assert inputs[0].dtype == outputs[0].dtype == DType.FLOAT32 and inputs[0].shape == (-1, 8, 8, 1)
    runtimes = ["litert", "openvino"] if fmt == ModelFormat.TFLITE else ["onnxruntime", "openvino"]
    for rt in runtimes:
        scores = predict_artifact(path, rt, digits["x_test"][:N_VERIFY])
        np.testing.assert_allclose(scores, float_scores, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Keras 3 models arrive as SavedModel directories (model.export)

KERAS3_EXPORT = """
import os, sys
import numpy as np
import keras
assert keras.__version__.startswith("3"), keras.__version__
d = np.load(sys.argv[1])
x, y = d["x"], d["y"]
keras.utils.set_random_seed(0)
m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 16.0),
    keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
    keras.layers.Dense(10, activation="softmax")])
m.compile("adam", "sparse_categorical_crossentropy")
m.fit(x, y, epochs=3, batch_size=32, verbose=0)
m.export(sys.argv[2], verbose=False)
np.save(sys.argv[3], m.predict(np.load(sys.argv[4])["x"][:N_VERIFY], verbose=0))
""".replace("N_VERIFY", str(N_VERIFY))


@pytest.fixture(scope="session")
def keras3_savedmodel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    out = tmp_path_factory.mktemp("keras3")
    sm, scores = out / "saved_model", out / "scores.npy"
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)  # a plain Keras 3 process, as the user has
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KERAS3_EXPORT,
            str(DATA / "digits.npz"),
            str(sm),
            str(scores),
            str(DATA / "digits_test.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sm, np.load(scores)


def convert_and_verify(
    model: Any, name: str, digits: dict[str, np.ndarray], out: Path, scores: np.ndarray, **kw: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Convert ``model`` for target ``name`` and verify it against the float ``scores``.

    Return (target, artifact, verification report).
    """
    target = load_target(name)
    art = convert_for_target(model, target, digits["x"], out, progress=False, **kw)
    return target, art, verify_artifact(art, target, digits["x_test"][:N_VERIFY], scores)


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_keras3_savedmodel_converts_for_every_target(
    name: str, keras3_savedmodel: tuple[Path, np.ndarray], digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    sm, scores = keras3_savedmodel
    target, art, r = convert_and_verify(sm, name, digits, tmp_path / name, scores)
    assert art.inputs[0].dtype == target.quantization.input_dtype
    assert r["top1_agreement"] >= MIN_AGREEMENT and r["float_ops"] == []
    if name == "coral":
        assert art.inputs[0].shape == (1, 8, 8, 1)


# --------------------------------------------------------------------------------------------------
# Quantization-aware models


@pytest.fixture(scope="session")
def qat_model(digits: dict[str, np.ndarray]) -> tuple[Any, np.ndarray]:
    import tensorflow_model_optimization as tfmot

    from toolchain.tfenv import import_keras, import_tf

    k = import_keras()
    import_tf().random.set_seed(0)
    base = _tiny_model(k, rescale=False)  # tfmot has no QuantizeConfig for Rescaling
    base.compile("adam", "sparse_categorical_crossentropy")
    base.fit(digits["x"], digits["y"], epochs=2, batch_size=32, verbose=0)
    q = tfmot.quantization.keras.quantize_model(base)
    q.compile("adam", "sparse_categorical_crossentropy")
    q.fit(digits["x"], digits["y"], epochs=1, batch_size=32, verbose=0)
    return q, np.asarray(q.predict(digits["x_test"][:N_VERIFY], verbose=0))


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_qat_model_converts_for_every_target(
    name: str, qat_model: tuple[Any, np.ndarray], digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    q, scores = qat_model
    target, art, r = convert_and_verify(q, name, digits, tmp_path / name, scores, qat=True)
    assert art.inputs[0].dtype == target.quantization.input_dtype
    assert art.outputs[0].dtype == target.quantization.output_dtype
    assert r["float_ops"] == [] and art.checks["weights_int8"]
    assert r["top1_agreement"] >= MIN_AGREEMENT


# --------------------------------------------------------------------------------------------------
# Verification fails on float ops


@pytest.fixture(scope="session")
def sin_model(digits: dict[str, np.ndarray]) -> Any:
    """A model with a layer that has no int8 TFLite kernel (SIN)."""
    from toolchain.tfenv import import_keras, import_tf

    k, tf = import_keras(), import_tf()
    inp = k.layers.Input((8, 8, 1))
    h = k.layers.Flatten()(inp)
    h = k.layers.Dense(16)(h)
    h = k.layers.Lambda(tf.math.sin)(h)
    out = k.layers.Dense(10, activation="softmax")(h)
    m = k.Model(inp, out)
    m.compile("adam", "sparse_categorical_crossentropy")
    m.fit(digits["x"] / 16.0, digits["y"], epochs=1, verbose=0)
    return m


@pytest.mark.slow
def test_a_float_op_left_in_a_full_int8_model_fails_naming_the_op(
    sin_model: Any, digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    from toolchain.tfenv import import_tf

    tf = import_tf()
    x = digits["x"][:100]

    def rep() -> Any:
        for i in range(len(x)):
            yield [x[i : i + 1]]

    # Convert the way a careless pipeline would: int8 where possible, float fallback allowed.
    c = tf.lite.TFLiteConverter.from_keras_model(sin_model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    c.inference_input_type = tf.int8
    c.inference_output_type = tf.int8
    path = tmp_path / "model.tflite"
    path.write_bytes(c.convert())
    inputs, outputs = read_io_specs(path, ModelFormat.TFLITE)
    art = Artifact(path, ModelFormat.TFLITE, inputs, outputs, ["litert"], size_bytes=path.stat().st_size)
    scores = np.asarray(sin_model.predict(x, verbose=0))
    with pytest.raises(VerificationError) as e:
        verify_artifact(art, load_target("raspberry-pi"), x, scores)
    msg = str(e.value)
    assert "keeps float op SIN" in msg and "raspberry-pi" in msg and "\n" not in msg


@pytest.mark.slow
def test_convert_for_target_refuses_a_float_op_the_converter_let_through(
    sin_model: Any, digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    # supported_ops=[TFLITE_BUILTINS_INT8] alone does not stop the converter from keeping SIN in
    # float: only the inspection of the written file catches it.
    with pytest.raises(VerificationError) as e:
        convert_for_target(sin_model, load_target("raspberry-pi"), digits["x"], tmp_path, progress=False)
    msg = str(e.value)
    assert "keeps float op SIN" in msg and "\n" not in msg
    assert not (tmp_path / "model.tflite").exists()


@pytest.mark.slow
def test_a_float_onnx_model_fails_x86_verification_naming_the_op(
    keras_model: Any, digits: dict[str, np.ndarray], float_scores: np.ndarray, tmp_path: Path
) -> None:
    path = convert_float(keras_model, ModelFormat.ONNX, tmp_path / "model.onnx")
    inputs, outputs = read_io_specs(path, ModelFormat.ONNX)
    art = Artifact(path, ModelFormat.ONNX, inputs, outputs, ["onnxruntime", "openvino"])
    with pytest.raises(VerificationError, match=r"keeps float op Conv "):
        verify_artifact(art, load_target("x86"), digits["x_test"][:N_VERIFY], float_scores)


@pytest.mark.slow
def test_wrong_io_dtype_for_the_profile_fails(artifacts: dict[str, Artifact]) -> None:
    from toolchain.steps.verify import inspect_artifact

    # The mobile artifact (float I/O) does not keep the raspberry-pi promise (int8 I/O).
    with pytest.raises(VerificationError, match="input .* of dtype float32; the profile promises int8"):
        inspect_artifact(artifacts["mobile"], load_target("raspberry-pi"))
    # A dynamic-batch artifact does not fit the Edge TPU.
    with pytest.raises(VerificationError, match="dtype int8; the profile promises uint8|static batch-1"):
        inspect_artifact(artifacts["raspberry-pi"], load_target("coral"))


# --------------------------------------------------------------------------------------------------
# OpenVINO's inference precision is pinned (bf16 is its default on AVX512-BF16/AMX CPUs)


@pytest.fixture
def machine_default_precision(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make OpenVINO's CPU plugin behave as on a machine whose default precision is ``request.param``:
    a compile without ``INFERENCE_PRECISION_HINT`` gets it (as bf16 CPUs do by themselves)."""
    import openvino as ov

    default = str(request.param)
    real = ov.Core.compile_model

    def compile_model(self: Any, model: Any, device: Any = "CPU", config: Any = None) -> Any:
        cfg = dict(config or {})
        cfg.setdefault("INFERENCE_PRECISION_HINT", default)
        return real(self, model, device, cfg)

    monkeypatch.setattr(ov.Core, "compile_model", compile_model)
    return default


@pytest.mark.slow
@pytest.mark.parametrize("machine_default_precision", ["f32", "bf16"], indirect=True)
@pytest.mark.parametrize("fmt", [ModelFormat.TFLITE, ModelFormat.ONNX], ids=lambda f: f.value)
def test_openvino_float_reference_matches_keras_whatever_the_machine_default(
    fmt: ModelFormat,
    machine_default_precision: str,
    keras_model: Any,
    digits: dict[str, np.ndarray],
    float_scores: np.ndarray,
    tmp_path: Path,
) -> None:
    from device_agent.runtimes import load_runtime_model

    path = convert_float(keras_model, fmt, tmp_path / f"float.{fmt.value}")
    model: Any = load_runtime_model(path, "openvino")
    assert model.precision == "f32"  # pinned, whatever the machine would choose
    scores = predict_artifact(path, "openvino", digits["x_test"][:N_VERIFY])
    np.testing.assert_allclose(scores, float_scores, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [ModelFormat.TFLITE, ModelFormat.ONNX], ids=lambda f: f.value)
def test_forcing_bf16_is_seen_where_the_cpu_has_it(
    fmt: ModelFormat,
    keras_model: Any,
    digits: dict[str, np.ndarray],
    float_scores: np.ndarray,
    tmp_path: Path,
) -> None:
    """The other way: bf16 asked for explicitly is what runs on a bf16 CPU, and it misses the float
    reference by more than the tolerance above (so that test would catch an unpinned adapter)."""
    from device_agent.inference import quantize
    from device_agent.runtimes import load_runtime_model
    from tests.cpu_precision import bf16_unavailable

    reason = bf16_unavailable()
    if reason is not None:  # AVX2-only CPUs: oneDNN has no bf16 kernels (the f32 tests above still run)
        pytest.skip(reason)
    path = convert_float(keras_model, fmt, tmp_path / f"float.{fmt.value}")
    model: Any = load_runtime_model(path, "openvino", precision="bf16")
    assert model.precision == "bf16"
    inputs, _ = read_io_specs(path, fmt)
    x = digits["x_test"][:N_VERIFY]
    out = np.asarray(model.run(quantize(x.astype(np.float32), inputs[0]))).reshape(len(x), -1)
    assert float(np.max(np.abs(out - float_scores))) > 1e-4
