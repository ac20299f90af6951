"""On-device profiling: ``edgefleet-agent bench``. Latency, peak memory and accuracy of a bundle here.

Every sample goes through ``Agent.predict`` one at a time, the path the daemon serves (checks,
preprocessing, quantization, the runtime, decoding and the statistics window), so the figures are
what an application on this device gets. Latency is the wall time of each ``predict`` call
(``time.perf_counter_ns``): ``WARMUP_RUNS`` unrecorded calls first, then at least ``runs`` timed
calls, cycling over the inputs. Accuracy counts each input once. Memory is the process's peak
resident set (``VmHWM`` in /proc/self/status, else ``getrusage``): Python, numpy, the runtime, the
model and its arena and delegate workspaces together; ``rss_before_load_bytes`` is the resident set
before the bundle was loaded, so the difference is what loading and running the model cost.

Only numpy and the bundle's runtime are imported: no TensorFlow, no host toolchain.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.errors import AgentError

BENCH_SCHEMA = 1
BENCH_RUNS = 200
WARMUP_RUNS = 20
SYNTHETIC_SAMPLES = 32
SYNTHETIC_SEED = 0
CPUINFO = Path("/proc/cpuinfo")
PROC_STATUS = Path("/proc/self/status")
# CPU features numerics depend on (kernels chosen, bf16 by default in OpenVINO, int8 dot products).
NUMERIC_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "neon",
    "asimd",
    "asimddp",
    "fphp",
    "asimdhp",
    "bf16",
    "i8mm",
    "sve",
)
# runtime -> distributions that provide it (the first installed one's version is reported)
RUNTIME_DISTS = {
    "litert": ("ai-edge-litert", "tflite-runtime"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "openvino": ("openvino",),
}


class BenchError(AgentError):
    """Bench inputs do not fit the bundle (shape, label count, unknown labels)."""


def cpu_info(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """Return the CPU's model name, feature flags and core count (from /proc/cpuinfo where present)."""
    model: str | None = None
    flags: list[str] = []
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    # x86: "model name"; Raspberry Pi and other ARM boards: "model" (board) or "hardware" (SoC).
    model = (
        fields.get("model name") or fields.get("model") or fields.get("hardware") or fields.get("cpu model")
    )
    flags = sorted(set((fields.get("flags") or fields.get("features") or "").split()))
    return {
        "model": model or platform.processor() or None,
        "machine": platform.machine(),
        "count": os.cpu_count(),
        "flags": flags,
        "numeric_flags": [f for f in NUMERIC_FLAGS if f in flags],
        "source": str(cpuinfo) if text else "platform",
    }


def _status_bytes(key: str) -> int | None:
    """Return a ``VmRSS``/``VmHWM`` figure of /proc/self/status in bytes (None where absent)."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int | None:
    """Return this process's peak resident set size in bytes."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # Linux and BSDs report KiB


def runtime_version(runtime: str) -> str | None:
    """Return the installed version of a runtime's Python distribution."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in RUNTIME_DISTS.get(runtime, ()):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def truth_labels(y: Sequence[Any], labels: Sequence[str]) -> list[str]:
    """Map true labels to the bundle's label names: names stay, class indices become names."""
    out = []
    for v in y:
        t = str(v.item() if isinstance(v, np.generic) else v)
        if t not in labels and t.lstrip("-").isdigit():
            i = int(t)
            if not 0 <= i < len(labels):
                raise BenchError(f"label {t} is not a class index of this bundle (0..{len(labels) - 1})")
            t = labels[i]
        out.append(t)
    unknown = sorted(set(out) - set(labels))
    if unknown:
        raise BenchError(
            f"labels {unknown[:5]} are not classes of this bundle ({', '.join(labels[:10])}); check --label"
        )
    return out


def synthetic_inputs(agent: Any, n: int = SYNTHETIC_SAMPLES) -> np.ndarray:
    """Return ``n`` inputs drawn uniformly within the baseline's range of each feature (fixed seed).

    Latency hardly depends on values for these runtimes; accuracy needs real labelled inputs.
    """
    spec = agent.model.spec
    shape = agent.model.predictor.sample_shape
    rng = np.random.default_rng(SYNTHETIC_SEED)
    prof = spec.new_profile().inputs
    edges = [prof.edge_list(j) for j in range(prof.n_features)]
    lo = float(min(e[0] for e in edges)) if edges else 0.0
    hi = float(max(e[-1] for e in edges)) if edges else 1.0
    if spec.features.kind == "elements" and len(edges) == int(np.prod(shape)):
        lows = np.asarray([e[0] for e in edges], dtype=np.float32)
        highs = np.asarray([e[-1] for e in edges], dtype=np.float32)
        x = lows + (highs - lows) * rng.random((n, len(edges)), dtype=np.float32)
        return np.ascontiguousarray(x.reshape((n, *shape)), dtype=np.float32)
    return np.ascontiguousarray(rng.uniform(lo, hi, size=(n, *shape)).astype(np.float32))


def as_batch(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return inputs read from a file as a batch (n, *shape): CSV rows are flattened samples, and a
    single sample gains a batch axis. Anything else is returned as it is, for the caller to check."""
    if x.ndim == 2 and x.shape[1:] != shape and x.shape[1] == int(np.prod(shape)):
        x = x.reshape((x.shape[0], *shape))
    if x.shape == shape:
        x = x[None, ...]
    return x


def run_bench(
    bundle: str | Path,
    x: np.ndarray | None = None,
    y: Sequence[Any] | None = None,
    *,
    runs: int = BENCH_RUNS,
    warmup: int = WARMUP_RUNS,
    runtime: str | None = None,
    threads: int | None = None,
    trusted_keys: Sequence[bytes] = (),
    input_name: str | None = None,
) -> dict[str, Any]:
    """Load ``bundle`` in an ``Agent`` and time ``predict`` one sample at a time; return the bench doc."""
    from device_agent.agent import Agent, agent_version

    if runs < 1 or warmup < 0:
        raise BenchError(f"runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    rss_before = _status_bytes("VmRSS")
    agent = Agent(
        bundle,
        trusted_keys=trusted_keys,
        allow_unsigned=not trusted_keys,
        runtime=runtime,
        threads=threads,
        window_s=float("inf"),
    )
    shape = agent.model.predictor.sample_shape
    synthetic = x is None
    if x is None:
        x = synthetic_inputs(agent)
    x = as_batch(np.asarray(x, dtype=np.float32), shape)
    if x.shape[1:] != shape or x.shape[0] == 0:
        want = "x".join(str(d) for d in shape)
        raise BenchError(f"inputs have shape {x.shape}; the bundle takes (n, {want})")
    x = np.ascontiguousarray(x)
    n = x.shape[0]
    truth = None
    if y is not None:
        if len(y) != n:
            raise BenchError(f"{len(y)} labels for {n} inputs")
        truth = truth_labels(list(y), agent.labels)
    for i in range(warmup):
        agent.predict(x[i % n : i % n + 1])
    total = max(runs, n)
    times = np.empty(total, dtype=np.float64)
    correct = 0
    for i in range(total):
        j = i % n
        sample = x[j : j + 1]
        t0 = time.perf_counter_ns()
        pred = agent.predict(sample)
        times[i] = (time.perf_counter_ns() - t0) / 1e6
        if truth is not None and i < n:
            correct += pred.labels[0] == truth[j]
    m = agent.model
    return {
        "schema": BENCH_SCHEMA,
        "bundle": {
            "name": m.manifest.name,
            "version": m.manifest.version,
            "target": m.manifest.target,
            "sha256": m.ref.sha256,
        },
        "runtime": m.runtime,
        "runtime_version": runtime_version(m.runtime),
        "threads": m.predictor.threads,
        "accelerated": bool(getattr(m.predictor.model, "accelerated", False)),
        "input": "synthetic" if synthetic else (input_name or "array"),
        "samples": n,
        "runs": total,
        "warmup_runs": warmup,
        "latency_ms_p50": round(float(np.percentile(times, 50)), 4),
        "latency_ms_p95": round(float(np.percentile(times, 95)), 4),
        "latency_ms_mean": round(float(times.mean()), 4),
        "latency_ms_max": round(float(times.max()), 4),
        "accuracy": (correct / n) if truth is not None else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_load_bytes": rss_before,
        "cpu": cpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "agent_version": agent_version(),
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
