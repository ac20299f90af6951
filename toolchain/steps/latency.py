"""Measure single-sample latency of a model file in one runtime on the build host.

Each measurement loads the model with the given thread count, runs ``WARMUP_RUNS`` unrecorded
inferences, then times ``repeats`` batch-1 inferences with ``time.perf_counter_ns`` and reports the
median and 95th percentile. Only the runtime's ``run`` call is timed (input quantization is done
once beforehand), the same call the agent makes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import ModelFormat
from toolchain.steps.artifact import VerificationError, read_io_specs

LATENCY_REPEATS = 200
WARMUP_RUNS = 20


def measure_latency(
    path: Path, runtime: str, sample: np.ndarray, threads: int, repeats: int | None = None
) -> dict[str, Any]:
    """Return ``{"p50_ms", "p95_ms", "mean_ms", "threads", "runs"}`` for one sample (batch 1)."""
    from device_agent.agent import quantize
    from device_agent.runtimes import load_runtime_model

    repeats = LATENCY_REPEATS if repeats is None else int(repeats)
    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats and threads must be positive (got {repeats}, {threads})")
    path = Path(path)
    fmt = ModelFormat.TFLITE if path.suffix == ".tflite" else ModelFormat.ONNX
    inputs, _ = read_io_specs(path, fmt)
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim == len(inputs[0].shape) - 1:
        x = x[None, ...]
    x = np.ascontiguousarray(quantize(x[:1], inputs[0]))
    try:
        model = load_runtime_model(path, runtime, threads=threads)
        for _ in range(WARMUP_RUNS):
            model.run(x)
        times = np.empty(repeats, dtype=np.float64)
        for i in range(repeats):
            t0 = time.perf_counter_ns()
            model.run(x)
            times[i] = (time.perf_counter_ns() - t0) / 1e6
    except Exception as e:
        lines = str(e).strip().splitlines()
        raise VerificationError(
            f"{runtime} cannot time {path.name}: {lines[0] if lines else type(e).__name__}"
        ) from None
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 4),
        "p95_ms": round(float(np.percentile(times, 95)), 4),
        "mean_ms": round(float(times.mean()), 4),
        "threads": int(threads),
        "runs": repeats,
    }


def measure_runtimes(
    path: Path, runtimes: list[str], sample: np.ndarray, threads: int
) -> dict[str, dict[str, Any]]:
    """Return ``{runtime: {"threads_1": ..., "threads_N": ...}}`` (N = the target's thread count)."""
    out: dict[str, dict[str, Any]] = {}
    for rt in runtimes:
        one = measure_latency(path, rt, sample, 1)
        many = one if threads == 1 else measure_latency(path, rt, sample, threads)
        out[rt] = {"threads_1": one, "threads_N": dict(many, threads=threads)}
    return out


def latency_figures(times: Any) -> dict[str, Any]:
    """Return ``latency_ms_p50``, ``latency_ms_p95`` and ``latency_runs`` of call times in ms."""
    return {
        "latency_ms_p50": round(float(np.percentile(times, 50)), 4),
        "latency_ms_p95": round(float(np.percentile(times, 95)), 4),
        "latency_runs": int(len(times)),
    }
