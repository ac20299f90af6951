"""ONNX Runtime adapter (CPU execution provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# ONNX tensor type names -> numpy dtypes (public: the build reads converted models' I/O with it)
TENSOR_TYPES = {
    "tensor(float)": np.float32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


class OrtModel:
    """An .onnx model in an ONNX Runtime session."""

    runtime = "onnxruntime"
    accelerated = False

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self._sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        inp = self._sess.get_inputs()[0]
        out = self._sess.get_outputs()[0]
        self._in_name = inp.name
        self._out_name = out.name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        self.input_dtype = np.dtype(TENSOR_TYPES.get(inp.type, np.float32))
        self.output_dtype = np.dtype(TENSOR_TYPES.get(out.type, np.float32))

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._sess.run([self._out_name], {self._in_name: x})[0])


def load(
    path: Path, threads: int = 1, accelerator_path: Path | None = None, precision: str | None = None
) -> OrtModel:
    """Load an .onnx model (the CPU provider computes float32 and int8 as the model says: no precision
    to pin)."""
    return OrtModel(path, threads=threads)
