"""Small real bundles for the agent's tests, built without the build pipeline (with tests/fabricate.py).

* ``onnx_bundle(dir)``: a dense softmax classifier of the 8x8 digits (weights fitted with numpy),
  written as a real ONNX graph with ``onnx.helper``; runs in ONNX Runtime and OpenVINO. No TensorFlow.
* ``tflite_bundle(dir)``: the same classifier as a tf_keras model converted to a full-int8 .tflite
  with TFLiteConverter (int8 input/output with their quantization in the manifest); runs in LiteRT and
  OpenVINO. TensorFlow runs in a subprocess, so the test process itself never imports it. With
  ``upsample=3`` it takes the digits as 24x24 images (statistics: per-channel summaries).

Both carry a ``baseline.json`` made by ``device_agent.formats.stats.build_baseline`` on the training split.
The shared ``digits_bundles`` fixture of tests/conftest.py replaces these where it is available.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tests.fabricate import LABELS, digits, onnx_dense, tensor
from tests.fabricate import write_bundle as fabricate_bundle

REPO = Path(__file__).resolve().parents[2]


def upsampled(x: np.ndarray, k: int) -> np.ndarray:
    """Digits (n, 8, 8, 1) with every pixel repeated k x k times: (n, 8k, 8k, 1)."""
    return x if k == 1 else np.repeat(np.repeat(x, k, axis=1), k, axis=2)


def fit_dense(shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Fit a linear softmax-ish classifier on digits/16 by ridge regression to one-hot targets (64x10)."""
    d = digits()
    x = d["x"].reshape(len(d["x"]), -1) / 16.0
    y = np.eye(10)[d["y"]]
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.linalg.solve(xb.T @ xb + 1e-1 * np.eye(65), xb.T @ y)
    w = w * 8.0  # sharpen so softmax is confident
    return w[:64].astype(np.float32) + np.float32(shift), w[64].astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return softmax(x.reshape(len(x), -1) / 16.0 @ w + b)


def write_bundle(
    root: Path,
    *,
    model_file: str,
    fmt: str,
    runtimes: list[str],
    inputs: list[Any],
    outputs: list[Any],
    name: str = "digits-dense",
    version: int = 1,
    target: str = "x86",
    preprocessing: dict | None = None,
    upsample: int = 1,
) -> Path:
    """Write baseline.json (the dense classifier on the training split), labels.txt and a schema-1
    manifest around a model file already in ``root`` (``upsample``: the model takes the digits
    scaled up by that factor, see ``upsampled``)."""
    from device_agent.formats.stats import build_baseline

    d = digits()
    w, b = fit_dense()
    return fabricate_bundle(
        root,
        model_file=model_file,
        fmt=fmt,
        runtimes=runtimes,
        inputs=inputs,
        outputs=outputs,
        labels=LABELS,
        baseline=build_baseline(upsampled(d["x"], upsample), forward(d["x"], w, b), LABELS),
        baseline_source={"data": "digits.npz"},
        labels_file=True,
        name=name,
        version=version,
        target=target,
        preprocessing=preprocessing or {"type": "affine", "scale": 1.0 / 16.0, "offset": 0.0},
        schema=1,
    )


def onnx_bundle(root: Path, version: int = 1, name: str = "digits-dense", shift: float = 0.0) -> Path:
    """Write an ONNX bundle (float32 I/O, dynamic batch) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    w, b = fit_dense(shift)
    (root / "model.onnx").write_bytes(onnx_dense(w, b, ["n", 8, 8, 1]))
    return write_bundle(
        root,
        model_file="model.onnx",
        fmt="onnx",
        runtimes=["onnxruntime", "openvino"],
        inputs=[tensor("x", (-1, 8, 8, 1), "float32")],
        outputs=[tensor("probs", (-1, 10), "float32")],
        name=name,
        version=version,
    )


def _convert_tflite(root: Path, upsample: int = 1) -> None:
    """(subprocess) Build the dense model in tf_keras and convert it to full-int8 TFLite (with
    ``upsample`` > 1, for the upsampled digits: an average pooling first gives the 8x8 back)."""
    sys.path.insert(0, str(REPO))
    from toolchain.tfenv import import_keras, import_tf

    tf = import_tf()
    keras = import_keras()
    w, b = fit_dense()
    pool = [keras.layers.AveragePooling2D(upsample)] if upsample > 1 else []
    model = keras.Sequential(
        [
            keras.layers.Input((8 * upsample, 8 * upsample, 1)),
            *pool,
            keras.layers.Rescaling(1.0 / 16.0),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.layers[-1].set_weights([w, b])
    x = upsampled(digits()["x"], upsample)

    def rep():
        for i in range(0, 200):
            yield [x[i : i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (root / "model.tflite").write_bytes(conv.convert())


def tflite_bundle(root: Path, version: int = 1, name: str = "digits-dense-int8", upsample: int = 1) -> Path:
    """Write a full-int8 TFLite bundle into ``root`` (TensorFlow runs in a subprocess); with
    ``upsample`` = 3 the model takes 24x24 images, which the statistics summarise per channel."""
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from tests.device_agent.agent_bundles import _convert_tflite; "
            f"from pathlib import Path; _convert_tflite(Path({str(root)!r}), {upsample})",
        ],
        check=True,
        env=env,
        cwd=str(REPO),
        capture_output=True,
        timeout=600,
    )
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(root / "model.tflite"))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def spec(d: dict, name: str, shape: list[int]) -> Any:
        scale, zp = d["quantization"]
        return tensor(name, shape, np.dtype(d["dtype"]).name, (scale, zp) if scale else None)

    # The Rescaling layer is inside the model: no preprocessing in the manifest.
    return write_bundle(
        root,
        model_file="model.tflite",
        fmt="tflite",
        runtimes=["litert", "openvino"],
        inputs=[spec(inp, "x", [int(v) for v in inp["shape_signature"]])],
        outputs=[spec(out, "probs", [int(v) for v in out["shape_signature"]])],
        name=name,
        version=version,
        target="raspberry-pi",
        preprocessing={"type": "none"},
        upsample=upsample,
    )


_CACHE = Path(tempfile.mkdtemp(prefix="edgefleet-agent-bundles-"))


@cache
def cached_onnx_bundle() -> Path:
    """One ONNX bundle per test process (copy it before changing it)."""
    return onnx_bundle(_CACHE / "onnx")


@cache
def cached_tflite_bundle() -> Path:
    """One int8 TFLite bundle per test process (converted once, in a subprocess)."""
    return tflite_bundle(_CACHE / "tflite")


@cache
def cached_tflite_image_bundle() -> Path:
    """One int8 TFLite bundle on 24x24 images (per-channel summary statistics) per test process."""
    return tflite_bundle(_CACHE / "tflite-24", name="digits-24-int8", upsample=3)
