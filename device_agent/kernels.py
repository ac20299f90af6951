"""The agent's per-sample hot path: one pass over a sample instead of about eight numpy calls.

``summary(v)`` returns a flat float32 sample's (min, max, sum, sum of squares); ``quantize(...)``
also writes its 8-bit codes; ``store_row(...)`` puts one prediction's scores and latency into a
statistics window's buffers and returns its top-1 index and score. They come from the C extension
``device_agent._kernels`` when it was built at install time (``setup.py``, optional: it needs a C
compiler, the Python headers and numpy's, which the build requirements provide), and from numpy
otherwise. ``NATIVE`` says which; ``EDGEFLEET_NATIVE_KERNELS=0`` turns the C path off (the tests
run that way too: tests/device_agent/test_kernel_builds.py).

Native only (None without the extension, and their callers take the numpy definitions):
``parse_floats(src, dst)``, the numbers of a JSON array text into a float32 buffer (the HTTP API's
JSON fast path; -1 whenever it cannot be sure, and the caller parses with orjson then);
``profile_update(...)`` and ``fold_outputs(...)``, the C versions of
``device_agent.formats.stats.FeatureSetProfile.update`` and of ``Profile.update_outputs`` for probability
scores (the same results to the bit); and ``Runner``, ``Agent.predict`` for a LiteRT model with
8-bit I/O in one call (docs/agent.md, *The single-sample hot path*).

Why C: on a model like MobileNetV2 the numpy calls around one inference cost about a fifth of the
inference, most of it in cache misses, because every call walks numpy's dispatch code again after
the model's run has evicted it. One small C loop touches a few cache lines instead.

Both paths quantize identically to ``device_agent.inference.quantize`` (float32 divide, round half
to even, add the zero point, clip). Their sums differ in the last bits (the C path adds float32
partial sums into doubles, numpy's dot accumulates in float32), which is far below what a summary
histogram resolves; within one install every path uses the same kernel, so a sample's features do
not depend on whether it arrived alone or in a batch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

Summary = tuple[float, float, float, float]

_native: Any = None
try:
    from device_agent import _kernels

    _native = _kernels
except ImportError:  # no compiler at install time: the numpy fallbacks below
    pass

NATIVE = _native is not None and os.environ.get("EDGEFLEET_NATIVE_KERNELS", "1") != "0"

# numpy helpers the agent's numpy paths share (formats/stats.py and inference.py import them from here).
vecdot = getattr(np, "vecdot", None)  # None on numpy < 2 (older Raspberry Pi OS)
min_reduce, max_reduce = np.minimum.reduce, np.maximum.reduce
# The clip ufunc itself: np.clip's Python wrapper costs about as much as clipping a 96x96 image.
clip_ufunc = (getattr(np, "_core", None) or np.core).umath.clip
_ONES: dict[int, np.ndarray] = {}


def ones_f32(n: int) -> np.ndarray:
    """A cached float32 vector of n ones (the right operand of a dot product that sums)."""
    got = _ONES.get(n)
    if got is None:
        got = _ONES[n] = np.ones(n, dtype=np.float32)
    return got


def summary_numpy(v: np.ndarray) -> Summary:
    """(min, max, sum, sum of squares) of a flat float32 array; min and max are NaN or infinite
    when a value is (both reductions propagate NaN)."""
    if vecdot is not None:
        s, ss = float(vecdot(v, ones_f32(v.shape[0]))), float(vecdot(v, v))
    else:  # numpy < 2 (older Raspberry Pi OS)
        s, ss = float(np.dot(v, ones_f32(v.shape[0]))), float(np.dot(v, v))
    return float(min_reduce(v)), float(max_reduce(v)), s, ss


def quantize_numpy(
    v: np.ndarray, scale: np.float32, zero_point: np.float32, qmin: int, qmax: int, out: np.ndarray
) -> Summary:
    """Write ``clip(rint(v / scale) + zero_point, qmin, qmax)`` into ``out``; return ``summary(v)``.

    A sample holding NaN or infinities is not quantized (its min/max say so; callers refuse it).
    """
    summ = summary_numpy(v)
    if not (np.isfinite(summ[0]) and np.isfinite(summ[1])):
        return summ
    np.copyto(out, codes_f32(v, scale, zero_point, np.float32(qmin), np.float32(qmax)), casting="unsafe")
    return summ


def codes_f32(
    x: np.ndarray, scale: np.float32, zero_point: np.float32, lo: np.float32, hi: np.float32
) -> np.ndarray:
    """``clip(rint(x / scale) + zero_point, lo, hi)`` in float32: the quantized codes before the
    cast to the integer dtype (``inference.TensorCodec.encode`` and ``quantize_numpy``)."""
    with np.errstate(over="ignore"):  # a huge value divides to inf, which clips to hi
        q = np.divide(x, scale, dtype=np.float32)
    np.rint(q, out=q)
    q += zero_point
    clip_ufunc(q, lo, hi, out=q)
    return q


def store_row_numpy(
    scores: np.ndarray, rows: np.ndarray, row: int, latencies: np.ndarray, latency: float
) -> tuple[int, float]:
    """Copy one prediction's float32 scores (K,) into ``rows[row]`` (float64) and its latency into
    ``latencies[row]``; return the top-1 index (numpy's argmax) and score."""
    v = scores.reshape(-1)
    rows[row] = v
    latencies[row] = latency
    top = int(v.argmax())
    return top, float(v[top])


def decode_row_numpy(
    raw: np.ndarray,
    table: np.ndarray,
    out: np.ndarray,
    rows: np.ndarray,
    row: int,
    latencies: np.ndarray,
    latency: float,
) -> tuple[int, float]:
    """Dequantize one prediction's 8-bit output codes through ``table`` (float32, indexed by the
    code's unsigned byte) into ``out`` (float32), then ``store_row`` it."""
    np.take(table, raw.reshape(-1).view(np.uint8), out=out.reshape(-1))
    return store_row_numpy(out, rows, row, latencies, latency)


if NATIVE:
    summary = _native.summary
    quantize = _native.quantize
    store_row = _native.store_row
    decode_row = _native.decode_row
    profile_update = _native.profile_update
    fold_outputs = _native.fold_outputs
    Runner = _native.Runner
    parse_floats: Any = getattr(_native, "parse_floats", None)  # None from an extension built before it
else:
    summary = summary_numpy
    quantize = quantize_numpy
    store_row = store_row_numpy
    decode_row = decode_row_numpy
    profile_update = None  # FeatureSetProfile.update runs its numpy definition
    fold_outputs = None  # Profile.update_outputs runs its numpy definition
    Runner = None  # Agent.predict takes its general path
    parse_floats = None  # the API's JSON fast path parses with orjson
