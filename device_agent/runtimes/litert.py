"""LiteRT adapter (``ai_edge_litert``, falling back to the older ``tflite_runtime`` wheel)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
EDGETPU_LIBRARY = "libedgetpu.so.1"


def _interpreter_module() -> Any:
    try:
        from ai_edge_litert import interpreter as mod
    except ImportError:  # older Raspberry Pi OS images only have tflite-runtime
        from tflite_runtime import interpreter as mod
    return mod


class LiteRTModel:
    """A .tflite model in a LiteRT interpreter (optionally on the Edge TPU delegate)."""

    runtime = "litert"

    def __init__(self, path: Path, threads: int = 1, accelerator_path: Path | None = None) -> None:
        mod = _interpreter_module()
        self.accelerated = False
        interp = None
        if accelerator_path is not None:
            try:
                delegate = mod.load_delegate(EDGETPU_LIBRARY)
                interp = mod.Interpreter(
                    model_path=str(accelerator_path), experimental_delegates=[delegate], num_threads=threads
                )
                self.accelerated = True
            except (ValueError, OSError, RuntimeError) as e:
                log.warning(
                    "Edge TPU delegate %s not usable (%s); running the CPU int8 model", EDGETPU_LIBRARY, e
                )
        if interp is None:
            interp = mod.Interpreter(model_path=str(path), num_threads=threads)
        self._interp = interp
        self._interp.allocate_tensors()
        inp = self._interp.get_input_details()[0]
        out = self._interp.get_output_details()[0]
        self._in_index = inp["index"]
        self._out_index = out["index"]
        sig = inp.get("shape_signature", inp["shape"])
        self.input_shape = tuple(int(d) for d in sig)
        self.input_dtype = np.dtype(inp["dtype"])
        self.output_dtype = np.dtype(out["dtype"])
        self._batch = int(inp["shape"][0])
        self._dynamic_batch = self.input_shape[0] == -1

    def run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n == self._batch:
            return self._invoke(x)
        if self._dynamic_batch:
            self._interp.resize_tensor_input(self._in_index, [n, *x.shape[1:]])
            self._interp.allocate_tensors()
            self._batch = n
            return self._invoke(x)
        # Static batch (Edge TPU models are batch 1): run sample by sample.
        return np.concatenate([self._invoke(x[i : i + 1]) for i in range(n)], axis=0)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self._interp.set_tensor(self._in_index, x)
        self._interp.invoke()
        return self._interp.get_tensor(self._out_index)  # a copy already (tensor() would be a view)

    def ops(self) -> list[dict[str, Any]]:
        """Return the interpreter's op list (name, inputs, outputs) for inspection."""
        return list(self._interp._get_ops_details())

    def tensors(self) -> list[dict[str, Any]]:
        """Return every tensor's details (name, dtype, shape, quantization)."""
        return list(self._interp.get_tensor_details())


def load(path: Path, threads: int = 1, accelerator_path: Path | None = None) -> LiteRTModel:
    """Load a .tflite model."""
    return LiteRTModel(path, threads=threads, accelerator_path=accelerator_path)
