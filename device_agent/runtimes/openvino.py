"""OpenVINO adapter (CPU plugin; reads .onnx and .tflite directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OpenVINOModel:
    """A model compiled for OpenVINO's CPU plugin."""

    runtime = "openvino"
    accelerated = False

    def __init__(self, path: Path, threads: int = 1) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        self._compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": int(threads),
                "PERFORMANCE_HINT": "LATENCY",
                # f32, not the bf16 the CPU plugin picks on AVX512-BF16/AMX CPUs (which also fails
                # to compile int8 QDQ models there: "No suitable implementations").
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        self._req = self._compiled.create_infer_request()
        inp = self._compiled.input(0)
        out = self._compiled.output(0)
        ps = inp.get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else -1 for d in ps)
        self.input_dtype = np.dtype(inp.get_element_type().to_dtype())
        self.output_dtype = np.dtype(out.get_element_type().to_dtype())

    def run(self, x: np.ndarray) -> np.ndarray:
        self._req.infer({0: x})
        return np.array(self._req.get_output_tensor(0).data, copy=True)


def load(path: Path, threads: int = 1, accelerator_path: Path | None = None) -> OpenVINOModel:
    """Load an .onnx or .tflite model."""
    return OpenVINOModel(path, threads=threads)
