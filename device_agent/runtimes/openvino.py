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
        self._compiled = core.compile_model(model, "CPU", self._config)
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
