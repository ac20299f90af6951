"""The record of a converted model and what its runtimes report about it; shared by the steps.

``Artifact`` (a converted file, its tensor specs, runtimes, latency and checks), the two errors of
conversion and verification, and ``read_io_specs`` (a model file's inputs and outputs as its runtime
reports them). ``convert``, ``verify`` and ``latency`` all build on this module and it imports none
of them, so the three never import each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import DType, ModelFormat, Quantization, TensorSpec
from toolchain.errors import ToolchainError


class ConversionError(ToolchainError):
    """A model could not be converted for a target, or its calibration data is unusable."""


class VerificationError(ToolchainError):
    """A converted artifact does not keep the target's promise (dtype, float op, runtime failure)."""


@dataclass
class Artifact:
    """A converted model file and what the runtimes report about it.

    ``inputs``/``outputs`` are as the runtime reports them (batch axis included, -1 when dynamic).
    ``runtimes`` is in order of preference; for several candidates it is ordered by the measured
    p50 latency at the target's thread count, fastest first. ``latency`` maps runtime ->
    ``{"threads_1": {"p50_ms", "p95_ms", ...}, "threads_N": {"p50_ms", "p95_ms", "threads": N, ...}}``.
    """

    path: Path
    format: ModelFormat
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtimes: list[str]
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready view (paths as strings, tensor specs as manifest dicts)."""
        return {
            "path": str(self.path),
            "format": self.format.value,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "runtimes": list(self.runtimes),
            "latency": self.latency,
            "checks": self.checks,
            "size_bytes": self.size_bytes,
        }


# --------------------------------------------------------------------------------------------------
# Tensor specs as the runtimes report them

_NP_DTYPES = {
    np.dtype(np.float32): DType.FLOAT32,
    np.dtype(np.int8): DType.INT8,
    np.dtype(np.uint8): DType.UINT8,
    np.dtype(np.int32): DType.INT32,
    np.dtype(np.int64): DType.INT64,
}


def to_dtype(dt: Any, where: str) -> DType:
    """Map a numpy dtype to the manifest's DType vocabulary."""
    d = np.dtype(dt)
    if d not in _NP_DTYPES:
        raise ConversionError(
            f"{where} has dtype {d}, which bundles cannot carry (float32, int8, uint8, int32, int64)"
        )
    return _NP_DTYPES[d]


def read_io_specs(path: Path, fmt: ModelFormat) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Return (inputs, outputs) of a model file as its runtime reports them."""
    if fmt == ModelFormat.TFLITE:
        return _tflite_specs(path)
    return _onnx_specs(path)


def _tflite_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from device_agent.runtimes.litert import interpreter_module, quiet_delegate_note

    try:
        with quiet_delegate_note():
            interp = interpreter_module().Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as e:
        raise ConversionError(f"LiteRT cannot load {path} ({str(e).splitlines()[0]})") from None

    def spec(d: dict[str, Any]) -> TensorSpec:
        shape = tuple(int(v) for v in d.get("shape_signature", d["shape"]))
        scale, zp = d["quantization"]
        quant = Quantization(float(scale), int(zp)) if scale else None
        return TensorSpec(d["name"], shape, to_dtype(d["dtype"], f"tensor {d['name']!r}"), quant)

    return [spec(d) for d in interp.get_input_details()], [spec(d) for d in interp.get_output_details()]


def _onnx_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnxruntime as ort

    from device_agent.runtimes.onnxruntime import TENSOR_TYPES

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception classes
        raise ConversionError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0]})") from None

    def spec(a: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in a.shape)
        if a.type not in TENSOR_TYPES:
            raise ConversionError(f"ONNX tensor {a.name!r} has type {a.type}, which bundles cannot carry")
        return TensorSpec(a.name, shape, to_dtype(TENSOR_TYPES[a.type], f"tensor {a.name!r}"), None)

    return [spec(a) for a in sess.get_inputs()], [spec(a) for a in sess.get_outputs()]
