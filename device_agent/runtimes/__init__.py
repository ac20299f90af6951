"""Runtime adapters: one module per runtime, the only files that import one.

Each adapter exposes a ``RuntimeModel``: raw tensors in, raw tensors out, in the dtypes of the model
file (quantization is applied by ``device_agent.inference.Predictor``, which speaks float).
Adapters are loaded on first use from the ``ADAPTERS`` table, so the agent imports only the runtime
it runs and installs without the others.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from device_agent.errors import AgentError

# name -> (module implementing it, python modules whose presence means it is installed)
ADAPTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "litert": ("device_agent.runtimes.litert", ("ai_edge_litert", "tflite_runtime")),
    "onnxruntime": ("device_agent.runtimes.onnxruntime", ("onnxruntime",)),
    "openvino": ("device_agent.runtimes.openvino", ("openvino",)),
}


class RuntimeError_(AgentError):
    """A runtime is missing or failed to load or run a model."""


class RuntimeModel(Protocol):
    """A loaded model in one runtime."""

    runtime: str
    input_shape: tuple[int, ...]  # with batch axis; -1 where dynamic
    input_dtype: np.dtype
    output_dtype: np.dtype
    accelerated: bool  # True when an accelerator delegate (Edge TPU) runs it

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (raw dtype) and return the first output (raw dtype)."""
        ...


def is_installed(runtime: str) -> bool:
    """Return True when the runtime's Python package can be imported here."""
    if runtime not in ADAPTERS:
        return False
    return any(importlib.util.find_spec(m) is not None for m in ADAPTERS[runtime][1])


def load_runtime_model(
    path: str | Path,
    runtime: str,
    threads: int = 1,
    accelerator_path: str | Path | None = None,
    precision: str | None = None,
) -> RuntimeModel:
    """Load a model file in the named runtime.

    ``precision`` is the inference precision for runtimes that choose one per machine (OpenVINO:
    ``f32`` when None, never the CPU's default); runtimes that always compute a model in its own
    types (LiteRT, ONNX Runtime on the CPU) take it and ignore it.
    """
    if runtime not in ADAPTERS:
        raise RuntimeError_(f"unknown runtime {runtime!r}. Known: {', '.join(ADAPTERS)}")
    if not is_installed(runtime):
        raise RuntimeError_(
            f"runtime {runtime!r} is not installed; pip install 'edgefleet[device]' (LiteRT) or 'edgefleet[x86]'"
        )
    module = importlib.import_module(ADAPTERS[runtime][0])
    return module.load(Path(path), threads=threads, accelerator_path=accelerator_path, precision=precision)


def choose_runtime(preferences: Sequence[str], override: str | None = None) -> str:
    """Return the first preferred runtime that is installed (or the override, which must be installed)."""
    if override:
        if not is_installed(override):
            raise RuntimeError_(f"configured runtime {override!r} is not installed here")
        return override
    for r in preferences:
        if is_installed(r):
            return r
    raise RuntimeError_(
        f"none of the bundle's runtimes ({', '.join(preferences)}) is installed; "
        "pip install 'edgefleet[device]' or 'edgefleet[x86]'"
    )
