"""Run a bundle's model on float inputs: preprocessing, quantization and dequantization included.

Callers always speak float values (raw feature values, as in the training data) and get float
scores back; the adapter applies the manifest's declared preprocessing and each tensor's
``{scale, zero_point}``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from device_agent.bundle import Manifest, TensorSpec, load_manifest
from device_agent.errors import AgentError
from device_agent.runtimes import RuntimeModel, choose_runtime, load_runtime_model


class InputError(AgentError):
    """An input does not fit the model; ``kind`` is ``shape``, ``dtype`` or ``nan`` (a schema violation)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Convert float values to the tensor's dtype with its affine quantization (float passes through)."""
    dtype = np.dtype(spec.dtype.value)
    if spec.quantization is None or dtype.kind == "f":
        return x.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    q = np.round(x / spec.quantization.scale) + spec.quantization.zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Convert a tensor's raw values to float32 with its affine quantization."""
    if spec.quantization is None or np.dtype(spec.dtype.value).kind == "f":
        return q.astype(np.float32, copy=False)
    return ((q.astype(np.float32) - spec.quantization.zero_point) * spec.quantization.scale).astype(
        np.float32
    )


# The clip ufunc itself: np.clip's Python wrapper costs about as much as clipping a 96x96 image.
_clip = (getattr(np, "_core", None) or np.core).umath.clip
_minimum, _maximum = np.minimum.reduce, np.maximum.reduce


class TensorCodec:
    """Quantize/dequantize one tensor with its parameters resolved once (the per-call path stays small)."""

    def __init__(self, spec: TensorSpec) -> None:
        self.dtype = np.dtype(spec.dtype.value)
        q = spec.quantization
        self.affine = q is not None and self.dtype.kind != "f"
        self.scale = np.float32(q.scale if q else 1.0)
        self.zero_point = np.float32(q.zero_point if q else 0)
        if self.affine:
            info = np.iinfo(self.dtype)
            self.lo, self.hi = np.float32(info.min), np.float32(info.max)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Float32 values -> the tensor's dtype (same result as ``quantize``)."""
        if not self.affine:
            return x.astype(self.dtype, copy=False)
        q = np.divide(x, self.scale, dtype=np.float32)
        np.rint(q, out=q)
        q += self.zero_point
        _clip(q, self.lo, self.hi, out=q)
        return q.astype(self.dtype)

    def decode(self, q: np.ndarray) -> np.ndarray:
        """The tensor's raw values -> float32 (same result as ``dequantize``)."""
        if not self.affine:
            return q.astype(np.float32, copy=False)
        out = q.astype(np.float32)
        out -= self.zero_point
        out *= self.scale
        return out


class Predictor:
    """A verified bundle loaded in one runtime; ``predict`` maps float inputs to float scores."""

    def __init__(
        self,
        bundle_dir: str | Path,
        manifest: Manifest | None = None,
        runtime: str | None = None,
        threads: int | None = None,
        use_accelerator: bool = True,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or load_manifest(self.bundle_dir)
        m = self.manifest
        self.runtime = choose_runtime([r.value for r in m.model.runtimes], runtime)
        accel = None
        if use_accelerator and m.model.accelerated_path and self.runtime == "litert":
            accel = self.bundle_dir / m.model.accelerated_path
        # The profile's thread count is for the device it names; never oversubscribe the cores we have.
        self.threads = threads or max(1, min(m.threads, os.cpu_count() or 1))
        self.model: RuntimeModel = load_runtime_model(
            self.bundle_dir / m.model.path, self.runtime, threads=self.threads, accelerator_path=accel
        )
        self.input_spec = m.inputs[0]
        self.output_spec = m.outputs[0]
        self._in_codec = TensorCodec(self.input_spec)
        self._out_codec = TensorCodec(self.output_spec)
        self.sample_shape = tuple(self.input_spec.shape[1:])
        pre = m.preprocessing
        self._affine: tuple[np.ndarray, np.ndarray] | None = None
        if pre.get("type") == "affine":
            self._affine = (
                np.asarray(pre["scale"], dtype=np.float32),
                np.asarray(pre["offset"], dtype=np.float32),
            )

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` as a float32 batch (n, *sample_shape) or raise InputError."""
        return self.check_input_range(x)[0]

    def check_input_range(self, x: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """``check_input``, also returning the batch's (min, max), which the finite check computes.

        Min and max propagate NaN and show infinities, so the two reductions are the finite check,
        and a window's image summary of a single sample reuses them.
        """
        arr = np.asarray(x)
        if not (arr.dtype == np.float32 and arr.shape[1:] == self.sample_shape and arr.shape[0] >= 1):
            if arr.dtype.kind not in "fiub":
                raise InputError("dtype", f"input dtype {arr.dtype} is not numeric; send numbers")
            if tuple(arr.shape) == self.sample_shape:
                arr = arr[None, ...]
            if tuple(arr.shape[1:]) != self.sample_shape or arr.shape[0] < 1:
                want = "x".join(str(d) for d in self.sample_shape)
                raise InputError(
                    "shape",
                    f"input shape {tuple(arr.shape)} does not fit the model: want (n, {want}) or ({want})",
                )
            arr = arr.astype(np.float32, copy=False)
        flat = arr.reshape(-1)
        lo, hi = float(_minimum(flat)), float(_maximum(flat))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError(
                "nan", "input holds NaN or infinite values; the model was trained on finite values only"
            )
        return arr, (lo, hi)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return float scores (n, K) for float inputs (n, *sample_shape) or one sample."""
        return self.predict_checked(self.check_input(x))

    def predict_checked(self, arr: np.ndarray) -> np.ndarray:
        """Return float scores (n, K) for a batch that ``check_input`` returned (skips a second check)."""
        if self._affine is not None:
            arr = arr * self._affine[0] + self._affine[1]
        raw = self.model.run(self._in_codec.encode(arr))
        out = self._out_codec.decode(raw)
        return out.reshape(out.shape[0], -1)
