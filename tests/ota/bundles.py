"""Small real bundles for the OTA tests: a softmax-regression ONNX model built with ``onnx.helper``.

The model is real (ONNX Runtime runs it), trained in closed form on the digits so it predicts sensibly,
and tiny, so the OTA tests need no TensorFlow. New versions are re-packaged (new manifest, new
signature) rather than retrained, as a release pipeline would re-sign an existing model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from device_agent.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    DType,
    Manifest,
    ModelEntry,
    ModelFormat,
    RuntimeName,
    TensorSpec,
    file_entry,
    load_manifest,
)
from device_agent.stats import baseline_to_dict, build_baseline

LABELS = [str(i) for i in range(10)]


def onnx_softmax_model(w: np.ndarray, b: np.ndarray) -> bytes:
    """Return an ONNX model computing softmax(x @ w + b) for x of shape (n, 64)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", w.shape[1]])],
        initializer=[
            numpy_helper.from_array(w.astype(np.float32), "w"),
            numpy_helper.from_array(b.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def fit_softmax(
    x: np.ndarray, y: np.ndarray, steps: int = 150, lr: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Fit a softmax regression with plain gradient descent (numpy; a second or so)."""
    xs = x.reshape(len(x), -1).astype(np.float32) / 16.0
    n, d = xs.shape
    w = np.zeros((d, 10), np.float32)
    b = np.zeros(10, np.float32)
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(steps):
        z = xs @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / n
        w -= lr * xs.T @ g
        b -= lr * g.sum(axis=0)
    # Fold the 1/16 input scaling into the weights so the model takes raw digit values.
    return w / 16.0, b


def write_bundle(
    out: Path,
    model_bytes: bytes,
    x_ref: np.ndarray,
    *,
    name: str = "digits",
    version: int = 1,
    target: str = "x86",
    labels: list[str] | None = None,
) -> Path:
    """Write a complete x86-style (ONNX, float I/O) bundle folder and return it."""
    from device_agent.inference import Predictor  # noqa: F401  (fail early if onnxruntime is missing)

    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model_bytes)
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    xs = x_ref.reshape(len(x_ref), -1).astype(np.float32)
    probs = sess.run(["probs"], {"x": xs})[0]
    labels = list(LABELS if labels is None else labels)
    base = build_baseline(xs, probs, LABELS)
    (out / "baseline.json").write_text(json.dumps(baseline_to_dict(base, {"data": "digits"})))
    manifest = Manifest(
        name=name,
        version=version,
        target=target,
        created_at="2026-11-27T00:00:00Z",
        files=[file_entry(out, "model.onnx"), file_entry(out, "baseline.json")],
        model=ModelEntry("model.onnx", ModelFormat.ONNX, (RuntimeName.ONNXRUNTIME,)),
        inputs=[TensorSpec("x", (-1, xs.shape[1]), DType.FLOAT32)],
        outputs=[TensorSpec("probs", (-1, 10), DType.FLOAT32)],
        labels=labels,
        preprocessing={"type": "none"},
    )
    (out / MANIFEST_FILE).write_bytes(manifest.to_bytes())
    return out


def repackage(
    src: Path,
    dst: Path,
    *,
    version: int,
    key: Path | None = None,
    target: str | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Copy a bundle under a new version (and optionally target/labels), then sign it with ``key``."""
    from toolchain.shipping.signing import sign_bundle

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / SIGNATURE_FILE).unlink(missing_ok=True)
    m = load_manifest(dst)
    m.version = version
    if target is not None:
        m.target = target
    if labels is not None:
        m.labels = labels
    (dst / MANIFEST_FILE).write_bytes(m.to_bytes())
    if key is not None:
        sign_bundle(dst, key)
    return dst
