"""Run a bundle's model on float inputs: preprocessing, quantization and dequantization included.

Callers always speak float values (raw feature values, as in the training data) and get float
scores back; the adapter applies the manifest's declared preprocessing and each tensor's
``{scale, zero_point}``. Images arrive in the caller's layout of the manifest's ``input_layout`` and
are transposed to the model's when the two differ; statistics see them as the caller sent them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from device_agent import kernels
from device_agent.errors import AgentError
from device_agent.formats.manifest import BundleError, Manifest, TensorSpec, load_manifest
from device_agent.kernels import Summary
from device_agent.runtimes import RuntimeModel, choose_runtime, load_runtime_model

NOT_FINITE = "input holds NaN or infinite values; the model was trained on finite values only"


class InputError(AgentError):
    """An input does not fit the model; ``kind`` is ``shape``, ``dtype`` or ``nan`` (a schema violation)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _finite_range(lo: float, hi: float) -> tuple[float, float]:
    """Return (lo, hi), a batch's min and max, or raise InputError (``nan``) when either is not
    finite: min and max propagate NaN and show infinities."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError("nan", NOT_FINITE)
    return lo, hi


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


_minimum, _maximum = kernels.min_reduce, kernels.max_reduce

# np.transpose axes that turn a batch in the caller's image layout into the model's, by
# (caller, model) layout of the manifest's ``input_layout``.
LAYOUT_PERMUTATIONS: dict[tuple[str, str], tuple[int, ...]] = {
    ("NCHW", "NHWC"): (0, 2, 3, 1),
    ("NHWC", "NCHW"): (0, 3, 1, 2),
}


def layout_permutation(layout: dict[str, str] | None, rank: int, name: str) -> tuple[int, ...] | None:
    """The axes that take a caller's batch to the model's layout, or None when no transposition is
    needed (no ``input_layout``, or the caller's layout is the model's)."""
    if layout is None or layout["caller"] == layout["model"]:
        return None
    perm = LAYOUT_PERMUTATIONS.get((layout["caller"], layout["model"]))
    if perm is None or rank != len(perm):
        raise BundleError(
            f"bundle {name!r} declares {layout['caller']} callers of a {layout['model']} model with a"
            f" rank-{rank} input; a layout conversion needs a rank-4 image input: rebuild the bundle"
        )
    return perm


def caller_sample_shape(model_sample_shape: tuple[int, ...], perm: tuple[int, ...] | None) -> tuple[int, ...]:
    """The sample shape callers send, given the model's and the caller-to-model axes."""
    if perm is None:
        return model_sample_shape
    full = (1, *model_sample_shape)
    inverse = np.argsort(perm)
    return tuple(int(full[i]) for i in inverse)[1:]


class TensorCodec:
    """Quantize/dequantize one tensor with its parameters resolved once (the per-call path stays small)."""

    def __init__(self, spec: TensorSpec) -> None:
        self.dtype = np.dtype(spec.dtype.value)
        q = spec.quantization
        self.affine = q is not None and self.dtype.kind != "f"
        self.scale = np.float32(q.scale if q else 1.0)
        self.zero_point = np.float32(q.zero_point if q else 0)
        self.table: np.ndarray | None = None  # 8-bit codes -> float32 (see decode)
        self.lut_ok = False  # an 8-bit affine tensor: table decoding and the native quantizer apply
        if self.affine:
            info = np.iinfo(self.dtype)
            self.lo, self.hi = np.float32(info.min), np.float32(info.max)
            self.qmin, self.qmax = int(info.min), int(info.max)
            if self.dtype.itemsize == 1:
                self.lut_ok = True
                # Every 8-bit code's float value, computed as ``decode`` computes it: decoding is
                # then one table lookup instead of three passes.
                codes = np.arange(256, dtype=np.uint8).view(self.dtype).astype(np.float32)
                codes -= self.zero_point
                codes *= self.scale
                self.table = codes

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Float32 values -> the tensor's dtype (same result as ``quantize``)."""
        if not self.affine:
            return x.astype(self.dtype, copy=False)
        return kernels.codes_f32(x, self.scale, self.zero_point, self.lo, self.hi).astype(self.dtype)

    def decode(self, q: np.ndarray) -> np.ndarray:
        """The tensor's raw values -> float32 (same result as ``dequantize``)."""
        if not self.affine:
            return q.astype(np.float32, copy=False)
        if self.table is not None and q.dtype == self.dtype:
            return self.table.take(q.view(np.uint8))
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
        # The precision the build verified the bundle in, pinned (OpenVINO would otherwise pick
        # bf16 on CPUs that have it).
        self.model: RuntimeModel = load_runtime_model(
            self.bundle_dir / m.model.path,
            self.runtime,
            threads=self.threads,
            accelerator_path=accel,
            precision=m.model.precision.value,
        )
        self.input_spec = m.inputs[0]
        self.output_spec = m.outputs[0]
        self._in_codec = TensorCodec(self.input_spec)
        self._out_codec = TensorCodec(self.output_spec)
        # What the model's tensor takes, and what callers send: the same unless the manifest's
        # input_layout says the caller's image layout differs from the artifact's (then every
        # input is transposed to the model's layout on its way in; see ``to_model_layout``).
        self.model_sample_shape = tuple(self.input_spec.shape[1:])
        self._perm = layout_permutation(m.input_layout, len(self.input_spec.shape), m.name)
        self.sample_shape = caller_sample_shape(self.model_sample_shape, self._perm)
        # The single-sample path's input buffer, handed to the runtime (callers serialize:
        # interpreters are not thread-safe either).
        self._one_in = np.empty((1, *self.model_sample_shape), dtype=self._in_codec.dtype)
        self._one_flat = self._one_in.reshape(-1)
        self._runner: Any = False  # see ``runner``: False until made, then a kernels.Runner or None
        self._batch_runner: Any = None  # see ``batch_runner``
        # Regression: the model outputs standardised targets; scores are ``out * scale + offset``
        # (the user's units). None for every other task.
        self._post: tuple[np.ndarray, np.ndarray] | None = None
        if m.task_type == "regression" and m.task is not None:
            self._post = (
                np.asarray(m.task["scale"], dtype=np.float32),
                np.asarray(m.task["offset"], dtype=np.float32),
            )
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
        arr = self.check_shape(x)
        self.check_finite(arr)
        return arr

    def check_shape(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` as a C-contiguous float32 batch (n, *sample_shape) or raise InputError
        (shape, dtype)."""
        arr = np.asarray(x)
        if (
            arr.dtype == np.float32
            and arr.shape[1:] == self.sample_shape
            and arr.shape[0] >= 1
            and arr.flags.c_contiguous
        ):
            return arr
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
        return np.ascontiguousarray(arr, dtype=np.float32)

    def check_finite(self, arr: np.ndarray) -> tuple[float, float]:
        """Return the batch's (min, max) or raise InputError (``nan``) for NaN or infinities.

        Min and max propagate NaN and show infinities: the two reductions are the finite check.
        """
        flat = arr.reshape(-1)
        return _finite_range(float(_minimum(flat)), float(_maximum(flat)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return float scores (n, K) for float inputs (n, *sample_shape) or one sample."""
        return self.predict_checked(self.check_input(x))

    def predict_checked(self, arr: np.ndarray) -> np.ndarray:
        """Return float scores (n, K) for a batch that ``check_input`` returned (skips a second check)."""
        return self.scores(self.model.run(self._encode(arr)))

    def to_model_layout(self, arr: np.ndarray) -> np.ndarray:
        """A checked batch in the caller's layout -> the same values in the model's tensor layout
        (C-contiguous); ``arr`` itself when the two layouts are one."""
        if self._perm is None:
            return arr
        return np.ascontiguousarray(arr.transpose(self._perm))

    def _encode(self, arr: np.ndarray) -> np.ndarray:
        """A checked float batch (caller's layout) -> the model's input: transposed to the model's
        layout, then the manifest's preprocessing (on the model's layout), then quantization."""
        arr = self.to_model_layout(arr)
        if self._affine is not None:
            arr = arr * self._affine[0] + self._affine[1]
        return self._in_codec.encode(arr)

    def _native_8bit(self) -> bool:
        """Whether the input is checked and quantized by one ``kernels.quantize`` pass."""
        return self._in_codec.lut_ok and self._affine is None

    def scores(self, raw: np.ndarray) -> np.ndarray:
        """The output tensor's raw values -> float scores (n, K)."""
        out = self._out_codec.decode(raw)
        out = out if out.ndim == 2 else out.reshape(out.shape[0], -1)
        if self._post is not None:
            out = out * self._post[0] + self._post[1]
        return out

    # The single-sample path: ``load_one`` then ``run_loaded``. One pass over the sample (the
    # native kernel) checks it, summarises it and writes the model's input; see device_agent.kernels.
    def load_one(self, arr: np.ndarray) -> Summary:
        """Check one float32 sample (1, *sample_shape) for NaN/infinity and write the model's input.

        Returns the sample's (min, max, sum, sum of squares) over its raw values, which the
        statistics window turns into image-summary features. Raises InputError (``nan``).
        """
        v = self.to_model_layout(arr).reshape(-1)
        c = self._in_codec
        if self._native_8bit():
            summ = kernels.quantize(v, c.scale, c.zero_point, c.qmin, c.qmax, self._one_flat)
            _finite_range(summ[0], summ[1])
        else:
            summ = kernels.summary(v)
            _finite_range(summ[0], summ[1])
            np.copyto(self._one_flat, self._encode(arr).reshape(-1))
        return summ

    def run_loaded(self) -> np.ndarray:
        """Run the sample ``load_one`` wrote; return the output tensor's raw values (``scores``
        turns them into float scores; ``out_table`` decodes 8-bit codes)."""
        return self.model.run(self._one_in)

    def encode_checked(self, arr: np.ndarray) -> np.ndarray:
        """A batch from ``check_shape`` -> the model's input, refusing NaN/infinity (InputError).

        An 8-bit input is checked and quantized in one native pass (``kernels.quantize``).
        """
        if self._native_8bit() and kernels.NATIVE:
            c = self._in_codec
            arr = self.to_model_layout(arr)
            out = np.empty(arr.shape, dtype=c.dtype)
            lo, hi, _, _ = kernels.quantize(
                arr.reshape(-1), c.scale, c.zero_point, c.qmin, c.qmax, out.reshape(-1)
            )
            _finite_range(lo, hi)
            return out
        self.check_finite(arr)
        return self._encode(arr)

    def run_encoded(self, q: np.ndarray) -> np.ndarray:
        """Run a batch ``encode_checked`` returned; return float scores (n, K)."""
        return self.scores(self.model.run(q))

    @property
    def runner(self) -> Any:
        """The native one-call path for single float32 samples (``kernels.Runner``), made on first
        use; None unless the runtime hands out its tensor memory (LiteRT), the kernels are built,
        and input and output are 8-bit affine with no preprocessing."""
        if self._runner is False:
            self._runner = self._make_runner(1)
        return self._runner

    def batch_runner(self, n: int) -> Any:
        """A ``kernels.Runner`` for batches of ``n`` on the runtime's batch interpreter, once a
        batch of ``n`` went the general way (which sized that interpreter); None otherwise.
        ``close_batch_runner`` must come before anything may resize that interpreter."""
        if self._batch_runner is not None and self._batch_runner.batch == n:
            return self._batch_runner
        self.close_batch_runner()
        self._batch_runner = self._make_runner(n)
        return self._batch_runner

    def close_batch_runner(self) -> None:
        """Close the batch runner (it lets go of the batch interpreter's tensors)."""
        if self._batch_runner is not None:
            self._batch_runner.close()
            self._batch_runner = None

    def close_runners(self) -> None:
        """Close both runners (a model switch): nothing of them uses the interpreters any more."""
        if self._runner:
            self._runner.close()
        self.close_batch_runner()

    @property
    def current_batch_runner(self) -> Any:
        """The batch runner made last and not closed, or None."""
        return self._batch_runner

    def _make_runner(self, n: int) -> Any:
        io = getattr(self.model, "direct_io", None)
        table = self.out_table
        if kernels.Runner is None or io is None or table is None or not self._native_8bit():
            return None
        if self._perm is not None:  # the runner writes samples as they come: no transposition
            return None
        got = io(n)
        if got is None:
            return None
        invoke, tin, tout = got
        c = self._in_codec
        # the runner holds the views until it is closed (see LiteRTModel.direct_io)
        return kernels.Runner(
            invoke, tin, tout, self.sample_shape, c.scale, c.zero_point, c.qmin, c.qmax, table, n
        )

    @property
    def out_table(self) -> np.ndarray | None:
        """The output's code table (float32 per 8-bit code) when the output is 8-bit quantized and
        its scores are the decoded codes (None for regression, whose scores are rescaled per target:
        those take the general path, ``scores``)."""
        return self._out_codec.table if self._post is None else None
