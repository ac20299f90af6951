"""The one test bundle fabricator: real bundles written without the build pipeline.

``write_bundle`` writes the manifest (and ``baseline.json``, ``labels.txt`` when asked) around a
model file already in the folder; the recipes below make the model files:

* ``onnx_dense(w, b, input_shape)``: softmax(x @ w + b) as a real ONNX graph made with
  ``onnx.helper`` (ONNX Runtime and OpenVINO run it); no TensorFlow. ``flat_onnx_bundle`` wraps one
  with a flat (n, 64) input into an x86-style bundle (the OTA tests' bundles).
* tests/device_agent/agent_bundles.py: the agent tests' ONNX and full-int8 .tflite bundles (TensorFlow
  in a subprocess), written through ``write_bundle`` too.
* ``placeholder_tflite``: bytes that only look like a model, for manifest and verification tests.

(``toolchain.fleet.sim.write_bundle`` is the simulator's own, shipped with the package, for the
fleet tests and demos without a model.)

``repackage`` copies a bundle under a new version (and target/labels) and signs it, as a release
pipeline re-signs an existing model. Used by tests/device_agent, tests/ota and tests/reliability.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "calibration_data"
LABELS = [str(i) for i in range(10)]
CREATED_AT = "2026-11-27T00:00:00Z"


def digits() -> dict[str, np.ndarray]:
    """The shipped digits as float32: x, y (train) and x_test, y_test; x is (n, 8, 8, 1) in 0..16."""
    tr = np.load(DATA / "digits.npz")
    te = np.load(DATA / "digits_test.npz")
    return {
        "x": tr["x"].astype(np.float32),
        "y": tr["y"],
        "x_test": te["x"].astype(np.float32),
        "y_test": te["y"],
    }


def onnx_dense(
    w: np.ndarray, b: np.ndarray, input_shape: Sequence[int | str], name: str = "digits_dense"
) -> bytes:
    """An ONNX model computing softmax(flatten(x) @ w + b): input ``x`` of ``input_shape`` (first
    axis dynamic, ``"n"``), output ``probs`` (n, K). A flat (n, F) input needs no Reshape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(w.astype(np.float32), "w"),
        numpy_helper.from_array(b.astype(np.float32), "b"),
    ]
    nodes = []
    flat = "x"
    if len(input_shape) > 2:
        inits.insert(0, numpy_helper.from_array(np.array([-1, w.shape[0]], dtype=np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["x", "shape"], ["flat"]))
        flat = "flat"
    nodes += [
        helper.make_node("MatMul", [flat, "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", w.shape[1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def fit_softmax(
    x: np.ndarray, y: np.ndarray, steps: int = 150, lr: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Fit a softmax regression of raw digits (n, ...) in 0..16 with plain gradient descent (numpy;
    a second or so); the 1/16 input scaling is folded into the weights (64x10, 10)."""
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
    return w / 16.0, b


def flat_onnx_bundle(
    out: Path,
    model_bytes: bytes,
    x_ref: np.ndarray,
    *,
    name: str = "digits",
    version: int = 1,
    target: str = "x86",
    labels: list[str] | None = None,
) -> Path:
    """An x86-style bundle (ONNX, float I/O, flat (n, F) input, no preprocessing) around an
    ``onnx_dense`` model; its baseline is ``x_ref`` and the model's own scores in ONNX Runtime."""
    import onnxruntime as ort

    from device_agent.formats.stats import build_baseline

    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model_bytes)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    xs = x_ref.reshape(len(x_ref), -1).astype(np.float32)
    probs = sess.run(["probs"], {"x": xs})[0]
    return write_bundle(
        out,
        model_file="model.onnx",
        fmt="onnx",
        runtimes=["onnxruntime"],
        inputs=[tensor("x", (-1, xs.shape[1]), "float32")],
        outputs=[tensor("probs", (-1, probs.shape[1]), "float32")],
        labels=LABELS if labels is None else labels,
        baseline=build_baseline(xs, probs, LABELS),
        name=name,
        version=version,
        target=target,
    )


def placeholder_tflite() -> bytes:
    """Bytes with the TFLite file identifier that no runtime is asked to load (manifest tests)."""
    return b"TFL3" + bytes(range(200))


def tensor(name: str, shape: Sequence[int], dtype: str, quantization: tuple[float, int] | None = None) -> Any:
    """A manifest ``TensorSpec`` (dtype by name; quantization as (scale, zero_point))."""
    from device_agent.formats.manifest import DType, Quantization, TensorSpec

    q = Quantization(scale=float(quantization[0]), zero_point=int(quantization[1])) if quantization else None
    return TensorSpec(name, tuple(int(v) for v in shape), DType(dtype), q)


def write_bundle(
    root: Path,
    *,
    model_file: str,
    fmt: str,
    runtimes: Sequence[str],
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    labels: Sequence[str],
    baseline: Any = None,
    baseline_source: dict[str, Any] | None = None,
    labels_file: bool = False,
    name: str = "digits",
    version: int = 1,
    target: str = "x86",
    preprocessing: dict[str, Any] | None = None,
    schema: int | None = None,
) -> Path:
    """Write ``manifest.json`` (listing every file it writes) around ``root/model_file``.

    ``baseline``: a ``device_agent.formats.stats.Profile`` (written as ``baseline.json`` with
    ``baseline_source``), a string (written as it is), or None (no file). ``labels_file`` adds
    ``labels.txt``. ``schema`` pins the manifest schema (default: the current one).
    """
    from device_agent.formats.manifest import (
        MANIFEST_SCHEMA,
        Manifest,
        ModelEntry,
        ModelFormat,
        RuntimeName,
        file_entry,
    )
    from device_agent.formats.stats import baseline_to_dict

    root.mkdir(parents=True, exist_ok=True)
    listed = [model_file]
    if baseline is not None:
        text = (
            baseline
            if isinstance(baseline, str)
            else json.dumps(baseline_to_dict(baseline, baseline_source or {"data": "digits"}))
        )
        (root / "baseline.json").write_text(text)
        listed.append("baseline.json")
    if labels_file:
        (root / "labels.txt").write_text("\n".join(labels) + "\n")
        listed.append("labels.txt")
    manifest = Manifest(
        name=name,
        version=version,
        target=target,
        created_at=CREATED_AT,
        files=[file_entry(root, p) for p in listed],
        model=ModelEntry(model_file, ModelFormat(fmt), tuple(RuntimeName(r) for r in runtimes)),
        inputs=list(inputs),
        outputs=list(outputs),
        labels=list(labels),
        preprocessing=preprocessing or {"type": "none"},
        schema=MANIFEST_SCHEMA if schema is None else schema,
    )
    (root / "manifest.json").write_bytes(manifest.to_bytes())
    return root


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
    from device_agent.formats.manifest import MANIFEST_FILE, SIGNATURE_FILE, load_manifest
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


TABULAR_LABELS = ["normal", "fault"]
TABULAR_SCALES = np.array([0.001, 1.0, 50.0, 4000.0], dtype=np.float32)


def tabular_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Data unlike the digits: 4 tabular columns from about 0.001 to 4000 and two unbalanced classes
    (about 1 in 5 is ``fault``: its last column runs high). Returns x (n, 4) float32 and y (n,) int."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int64)
    x = rng.random((n, 4)).astype(np.float32) * TABULAR_SCALES
    x[:, 3] += y * 3000.0 * rng.random(n).astype(np.float32)
    return x, y


def tabular_onnx_bundle(out: Path, *, name: str = "pump", version: int = 1) -> Path:
    """An ONNX bundle of a two-class model of ``tabular_data`` (``fault`` when column 3 is above
    about 3000), with its baseline from 400 rows in ONNX Runtime."""
    import onnxruntime as ort

    from device_agent.formats.stats import build_baseline

    w = np.zeros((4, 2), np.float32)
    w[3] = [0.0, 0.01]
    b = np.array([0.0, -30.0], np.float32)
    model = onnx_dense(w, b, ["n", 4], name=name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model)
    x, _ = tabular_data(400, seed=1)
    probs = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["probs"], {"x": x})[0]
    return write_bundle(
        out,
        model_file="model.onnx",
        fmt="onnx",
        runtimes=["onnxruntime"],
        inputs=[tensor("x", (-1, 4), "float32")],
        outputs=[tensor("probs", (-1, 2), "float32")],
        labels=TABULAR_LABELS,
        baseline=build_baseline(x, probs, TABULAR_LABELS, feature_names=["flow", "temp", "rpm", "vib"]),
        baseline_source={"data": "tabular_data(400, seed=1)"},
        name=name,
        version=version,
    )


# Units from 0.001 to 4000: a tabular set far from the shipped digits' 0..16.
REGIME_UNITS = np.array([0.001, 0.05, 2.0, 40.0, 700.0, 4000.0])


def shifted_regime(seed: int, n: int, new: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tabular samples: 'fault' for the top quarter of a score whose rule differs in the NEW regime."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    if new:
        z[:, 4] += 4.0  # the NEW operating point, far from anything OLD held
        s = z[:, 0] - z[:, 1] + 0.3 * z[:, 2]
    else:
        s = z[:, 0] + z[:, 1] + 0.3 * z[:, 2]
    y = (s > np.quantile(s, 0.75)).astype(np.int64)
    return ((z * 0.25 + 1.0) * REGIME_UNITS).astype(np.float32), y


def shifted_images(seed: int, n: int, new: bool) -> tuple[np.ndarray, np.ndarray]:
    """10x10x1 images in [0, 1]: a bright row, column or cross (60/25/15) on noise; NEW ones inverted."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.6, 0.25, 0.15]).astype(np.int64)
    x = rng.uniform(0, 0.3, size=(n, 10, 10, 1))
    pos = rng.integers(2, 8, size=n)
    for i in range(n):
        if y[i] in (0, 2):
            x[i, pos[i], :, 0] = rng.uniform(0.7, 1.0)
        if y[i] in (1, 2):
            x[i, :, pos[i], 0] = rng.uniform(0.7, 1.0)
    if new:
        x = 1.0 - x
    return x.astype(np.float32), y


# Anomaly detection (issue 15): normal samples on a low-dimensional structure, anomalies off it.
ANOMALY_TABULAR_SCALES = np.array([0.001, 0.05, 1.0, 7.0, 60.0, 300.0, 1500.0, 4000.0], dtype=np.float32)


def anomaly_tabular(
    n: int, anomaly_fraction: float = 0.0, seed: int = 0, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Tabular rows in units from 0.001 to 4000: normal rows follow two hidden factors (8 correlated
    columns plus a little noise); anomalies break that structure (columns drawn independently with
    the same spread) or carry a 4-sigma spike in one column. ``strength`` in (0, 1] makes them
    subtler: the spike is ``4 * strength`` sigma and broken rows keep ``1 - strength`` of their
    structure's variance. Returns x (n, 8) float32, y (n,) 1 = anomaly."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1234).normal(size=(2, 8))  # the same structure for every draw
    mix /= np.linalg.norm(mix, axis=0, keepdims=True)
    y = (rng.random(n) < anomaly_fraction).astype(np.int64)
    z = rng.normal(size=(n, 2)) @ mix + 0.1 * rng.normal(size=(n, 8))
    bad = np.flatnonzero(y)
    spike = bad[: len(bad) // 2]
    shuffled = bad[len(bad) // 2 :]
    noise = rng.normal(size=(len(shuffled), 8))
    z[shuffled] = np.sqrt(1.0 - strength) * z[shuffled] + np.sqrt(strength) * noise
    cols = rng.integers(0, 8, size=len(spike))
    z[spike, cols] += rng.choice([-4.0, 4.0], size=len(spike)) * strength
    x = (2.0 + z) * ANOMALY_TABULAR_SCALES
    return x.astype(np.float32), y


def anomaly_images(
    n: int, anomaly_fraction: float = 0.0, seed: int = 0, side: int = 16, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """[0, 1] images (n, side, side, 1): normal ones are one smooth blob (random place, width and
    brightness) with faint noise; anomalies are stripes (random frequency and angle) or speckle noise,
    laid over a normal blob with weight ``strength`` in (0, 1] (1: the pattern alone).
    Returns x float32 and y (n,) int, 1 = anomaly."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < anomaly_fraction).astype(np.int64)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    out = np.empty((n, side, side), dtype=np.float64)

    def blob() -> np.ndarray:
        cy, cx = rng.uniform(side * 0.25, side * 0.75, size=2)
        w = rng.uniform(side / 8, side / 4)
        return np.asarray(rng.uniform(0.6, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w)))

    for i in range(n):
        if not y[i]:
            img = blob()
        else:
            if rng.random() < 0.5:
                f, a, p = rng.uniform(0.15, 0.4), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
                img = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + p)
            else:
                img = rng.random((side, side)) * rng.uniform(0.5, 1.0)
            if strength < 1.0:
                img = strength * img + (1.0 - strength) * blob()
        out[i] = img + 0.02 * rng.normal(size=(side, side))
    return np.clip(out, 0.0, 1.0)[..., None].astype(np.float32), y
