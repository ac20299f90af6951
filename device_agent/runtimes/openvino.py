"""OpenVINO adapter (CPU plugin; reads .onnx and .tflite directly).

Two things are pinned here rather than left to the machine (see docs/conversion.md):

* Inference precision. The CPU plugin computes in bfloat16 by default on CPUs with AVX512-BF16 or
  AMX, and in float32 elsewhere, so the same model gives different numbers on different devices.
  Every model is compiled with an explicit ``INFERENCE_PRECISION_HINT`` (the bundle's
  ``model.precision``, ``f32`` unless the build verified something else).
* The batch size of single samples. OpenVINO 2026.4 computes some int8 QDQ models (MobileNetV2 at
  32x32, whose depthwise convolutions run on a 1x1 feature map) wrongly at batch 1 when the batch
  axis is dynamic, on CPUs with VNNI but without AMX, while the same compiled model is right for
  larger batches. Single samples (the daemon's path) therefore run on a copy reshaped to a static
  batch of 1; batches run on the model as it is, compiled on the first batch. The build checks both
  paths against the float model (``toolchain.steps.parity``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

# The precision a bundle without ``model.precision`` (schema 1) runs in: what the build verified.
DEFAULT_PRECISION = "f32"
PRECISIONS = ("f32", "bf16", "f16")
# Run single samples on a static batch-1 copy of a dynamic-batch model (see above); tests turn it
# off to show what the build's parity check catches without it.
STATIC_BATCH_1 = True


class OpenVINOModel:
    """A model compiled for OpenVINO's CPU plugin at a pinned inference precision."""

    runtime = "openvino"
    accelerated = False

    def __init__(self, path: Path, threads: int = 1, precision: str = DEFAULT_PRECISION) -> None:
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is unknown. Known: {', '.join(PRECISIONS)}")
        self._core = core = ov.Core()
        self._path = Path(path)
        self._config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        }
        model = core.read_model(str(path))
        ps = model.input(0).get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else -1 for d in ps)
        self._dynamic = ps.rank.is_static and ps.rank.get_length() > 0 and not ps[0].is_static
        self._one_batch = 1 if self._dynamic or self.input_shape[:1] == (1,) else self.input_shape[0]
        if STATIC_BATCH_1 and self._dynamic and all(d.is_static for d in list(ps)[1:]):
            model.reshape([1, *self.input_shape[1:]])  # single samples: a static batch of 1
        # A precision other than f32 is checked with the probe first: on some CPUs a capped oneDNN
        # fails the compile, on others the plugin compiles this model and silently ignores the hint
        # (or computes some layers in f32): either way not what the bundle was verified in.
        problem = None if precision == DEFAULT_PRECISION else precision_problem(precision)
        try:
            if problem is not None:
                raise RuntimeError(problem)
            self._compiled = core.compile_model(model, "CPU", self._config)
        except RuntimeError as e:
            if precision == DEFAULT_PRECISION:
                raise
            # oneDNN has no kernels for this precision here (bf16 on an AVX2-only CPU): say so in one
            # line instead of OpenVINO's multi-line "could not create a primitive descriptor".
            from device_agent.runtimes import RuntimeError_

            raise RuntimeError_(
                f"OpenVINO cannot compute {Path(path).name!r} in {precision} on this CPU"
                f" ({_first_line(e)}); run a bundle verified in {DEFAULT_PRECISION} or another runtime"
            ) from None
        self._req = self._compiled.create_infer_request()
        # Batches of other sizes: the model as read (dynamic batch), compiled on the first batch.
        self._batch_req: Any = None
        inp = self._compiled.input(0)
        out = self._compiled.output(0)
        self.input_dtype = np.dtype(inp.get_element_type().to_dtype())
        self.output_dtype = np.dtype(out.get_element_type().to_dtype())
        # What the plugin says it computes in (``f32``, ``bf16``...), for reports and status.
        self.precision = _precision_name(self._compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == self._one_batch or not self._dynamic:
            self._req.infer({0: x})
            return np.array(self._req.get_output_tensor(0).data, copy=True)
        if self._batch_req is None:
            compiled = self._core.compile_model(self._core.read_model(str(self._path)), "CPU", self._config)
            self._batch_req = compiled.create_infer_request()
        self._batch_req.infer({0: x})
        return np.array(self._batch_req.get_output_tensor(0).data, copy=True)


def _first_line(e: BaseException) -> str:
    """The line of an OpenVINO exception that says what went wrong (not its source locations)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    first = lines[0] if lines else type(e).__name__
    return first.split(". ")[0].rstrip(".")[:160]  # drop "Run workload with ONEDNN_VERBOSE..." advice


@functools.cache
def precision_problem(precision: str) -> str | None:
    """Return None when the CPU plugin really computes in ``precision`` here, else why not (one line).

    Asked of the runtime itself: a one-layer model is compiled with the hint and run once. The CPU's
    flags alone do not tell (OpenVINO emulates bf16 on AVX-512 CPUs without AVX512-BF16, and lists
    BF16 among its capabilities where a capped oneDNN, ``ONEDNN_MAX_CPU_ISA``, has no bf16 kernel).
    """
    import openvino as ov
    import openvino.opset13 as ops

    if precision not in PRECISIONS:
        return f"precision {precision!r} is unknown"
    param = ops.parameter([1, 8], np.float32)
    weights = ops.constant(np.linspace(-1.0, 1.0, 32, dtype=np.float32).reshape(8, 4))
    probe = ov.Model([ops.matmul(param, weights, False, False)], [param], "precision-probe")
    try:
        compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        compiled.create_infer_request().infer({0: np.ones((1, 8), np.float32)})
    except RuntimeError as e:
        return f"the CPU plugin has no {precision} kernels here ({_first_line(e)})"
    got = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if got != precision:
        return f"the CPU plugin computes in {got} when asked for {precision} (no {precision} support)"
    return None


def _precision_name(value: Any) -> str:
    """OpenVINO's element type (``<Type: 'float32'>``) or string -> ``f32``/``bf16``/``f16``."""
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    names = {
        "float32": "f32",
        "f32": "f32",
        "bfloat16": "bf16",
        "bf16": "bf16",
        "float16": "f16",
        "f16": "f16",
    }
    return names.get(text, text)


def load(
    path: Path, threads: int = 1, accelerator_path: Path | None = None, precision: str | None = None
) -> OpenVINOModel:
    """Load an .onnx or .tflite model, computing in ``precision`` (``f32`` when None)."""
    return OpenVINOModel(path, threads=threads, precision=precision or DEFAULT_PRECISION)
