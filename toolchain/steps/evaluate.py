"""Measure artifacts and bundles: accuracy, sparsity of the shipped weights, latency per runtime.

Everything here runs in the device runtimes (LiteRT, ONNX Runtime, OpenVINO) through
``device_agent``; TensorFlow is never used to measure what ships.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import ModelFormat, VerifyPolicy, verify_bundle
from device_agent.runtimes import is_installed
from toolchain.errors import ToolchainError
from toolchain.steps.data import DataError, Dataset, conform
from toolchain.steps.per_class import class_report, predicted_classes

# Repeats per latency measurement in `edgefleet evaluate` (the build uses the converter's default).
EVAL_LATENCY_REPEATS = 100
GZIP_LEVEL = 9


class EvaluateError(ToolchainError):
    """A bundle or artifact cannot be measured."""


def gzip_size(path: Path) -> int:
    """Return the size in bytes of ``path`` compressed with gzip -9 (what pruning buys on the wire)."""
    with open(path, "rb") as fh:
        return len(gzip.compress(fh.read(), compresslevel=GZIP_LEVEL, mtime=0))


def artifact_sparsity(path: Path) -> float | None:
    """Return the fraction of zero weights in a model file's kernels (constant tensors with >= 2 axes).

    A weight counts as zero when its stored value equals its zero point (int8 weights are symmetric,
    so that is 0) or is exactly 0.0 for float weights. Returns None when the file has no kernels.
    """
    path = Path(path)
    if path.suffix == ".tflite":
        return _tflite_sparsity(path)
    if path.suffix == ".onnx":
        return _onnx_sparsity(path)
    raise EvaluateError(f"cannot measure sparsity of {path.name}: not a .tflite or .onnx file")


def tflite_constants(path: Path) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield (tensor record, stored values) of every int8/uint8/float32 constant with >= 2 axes in a .tflite."""
    from device_agent.runtimes.litert import interpreter_module
    from toolchain.steps.edgetpu import read_tflite

    model = read_tflite(path)
    interp = interpreter_module().Interpreter(model_path=str(path))
    for t in model.tensors:
        if not t.is_constant or len(t.shape) < 2 or t.dtype not in ("int8", "uint8", "float32"):
            continue
        try:
            yield t, np.asarray(interp.get_tensor(t.index))
        except ValueError:
            continue


def onnx_constants(model: Any) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield (initializer, values) of every int8/uint8/float32 initializer with >= 2 axes of an ONNX model."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if len(init.dims) < 2:
            continue
        arr = numpy_helper.to_array(init)
        if arr.dtype in (np.int8, np.uint8, np.float32):
            yield init, arr


def _tflite_sparsity(path: Path) -> float | None:
    zeros = total = 0
    for t, arr in tflite_constants(path):
        zp: np.ndarray = np.asarray(t.zero_point, dtype=np.int64) if t.zero_point else np.zeros(1, np.int64)
        if arr.dtype.kind in "iu" and zp.size > 1:
            shape = [1] * arr.ndim
            shape[t.quantized_dimension] = zp.size
            zp = zp.reshape(shape)
        elif arr.dtype.kind == "f":
            zp = np.zeros(1, np.int64)
        zeros += int((arr == zp).sum())
        total += arr.size
    return zeros / total if total else None


def _onnx_sparsity(path: Path) -> float | None:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    zps: dict[str, tuple[str, int]] = {}
    for node in m.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) >= 3:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zps[node.input[0]] = (node.input[2], int(axis))
    inits = {i.name: i for i in m.graph.initializer}
    zeros = total = 0
    for init, arr in onnx_constants(m):
        zp: Any = 0
        if arr.dtype.kind in "iu" and init.name in zps and zps[init.name][0] in inits:
            zp_arr = numpy_helper.to_array(inits[zps[init.name][0]])
            if zp_arr.size == 1:
                zp = zp_arr.reshape(())
            else:
                shape = [1] * arr.ndim
                shape[zps[init.name][1] % arr.ndim] = zp_arr.size
                zp = zp_arr.reshape(shape)
        zeros += int((arr == zp).sum())
        total += arr.size
    return zeros / total if total else None


def evaluate_bundle(
    bundle_dir: str | Path,
    data: Dataset,
    *,
    runtimes: list[str] | None = None,
    repeats: int = EVAL_LATENCY_REPEATS,
    progress: bool = True,
) -> dict[str, Any]:
    """Re-measure a bundle on labelled data: accuracy, per-class metrics and latency in each runtime.

    Accuracy and the per-class figures come from the device's path (``device_eval.evaluate_on_agent``:
    the agent, batch 1 and its batch size, the bundle's pinned precision); ``accuracy`` is the worse
    path's, as in the build's report. Per runtime: ``accuracy``, ``paths``, ``latency_ms_p50``/``p95``
    (one ``Agent.predict`` call), ``threads``, ``precision``, ``per_class`` (``{label: {precision, recall, f1, support}}``),
    ``confusion_matrix`` (rows true, columns predicted, in ``labels`` order) and ``latency``; the
    top-level ``per_class`` and ``confusion_matrix`` are the preferred runtime's.
    """
    from toolchain.steps.device_eval import evaluate_on_agent
    from toolchain.steps.latency import measure_latency

    root = Path(bundle_dir)
    manifest = verify_bundle(root, VerifyPolicy(allow_unsigned=True))
    sample_shape = tuple(manifest.inputs[0].shape[1:])
    if data.sample_shape != sample_shape:
        raise DataError(
            f"data {data.source!r} has samples of shape {data.sample_shape} but bundle {manifest.name!r}"
            f" ({manifest.target}) takes {sample_shape}; pass data that matches the model input"
        )
    data = conform(data, manifest.labels)
    wanted = runtimes or [r.value for r in manifest.model.runtimes]
    usable = [r for r in wanted if is_installed(r)]
    if not usable:
        raise EvaluateError(
            f"none of the bundle's runtimes ({', '.join(wanted)}) is installed here; pip install "
            "'edgefleet[host]'"
        )
    model_path = root / manifest.model.path
    per_runtime: dict[str, Any] = {}
    for rt in usable:
        # As the device runs it (the agent, one sample at a time and in its batches), like the build.
        device, scores = evaluate_on_agent(root, rt, data.x, data.y)
        one = measure_latency(model_path, rt, data.x[:1], 1, repeats)
        many = (
            one
            if manifest.threads == 1
            else measure_latency(model_path, rt, data.x[:1], manifest.threads, repeats)
        )
        per_runtime[rt] = {
            **device,
            "latency": {"threads_1": one, "threads_N": dict(many, threads=manifest.threads)},
        }
        if data.y is not None:  # per_class, confusion_matrix (rows true, columns predicted)
            per_runtime[rt].update(class_report(data.y, predicted_classes(scores), manifest.labels))
    preferred = usable[0]
    built = manifest.metrics
    classes = {
        k: per_runtime[preferred][k] for k in ("per_class", "confusion_matrix") if k in per_runtime[preferred]
    }
    return {
        "bundle": str(root),
        "name": manifest.name,
        "version": manifest.version,
        "target": manifest.target,
        "format": manifest.model.format.value,
        "data": data.source,
        "samples": data.n,
        "preferred_runtime": preferred,
        "accuracy": per_runtime[preferred]["accuracy"],
        "build_accuracy": built.get("accuracy"),
        "float_accuracy_at_build": built.get("float_accuracy"),
        "latency_ms_p50": per_runtime[preferred]["latency"]["threads_N"]["p50_ms"],
        "latency_ms_p95": per_runtime[preferred]["latency"]["threads_N"]["p95_ms"],
        "size_bytes": model_path.stat().st_size,
        "sparsity": artifact_sparsity(model_path),
        "per_runtime": per_runtime,
        "labels": list(manifest.labels),
        **classes,
    }


def model_format(path: Path) -> ModelFormat:
    """Return the format of a model file by suffix."""
    return ModelFormat.TFLITE if Path(path).suffix == ".tflite" else ModelFormat.ONNX
