"""Pure, mergeable profiles of what a model sees and says.

One module serves the build (``baseline.json``), the agent (telemetry windows) and the collector
(drift), so a baseline and a device window can never disagree on bin edges or feature names.

No I/O and no clock here. Everything is plain numpy and dicts that round-trip through JSON.

Histogram layout (per feature): ``counts[0]`` is the underflow bin (``x < edges[0]``), ``counts[1..B]``
the B regular bins (``[e_i, e_{i+1})``, the last one closed on the right), ``counts[B+1]`` the
overflow bin (``x > edges[B]``). Non-finite values (NaN, +/-inf) are counted in ``nan_count`` and in
no bin. Edges are frozen from the baseline and travel with it; windows carry only a ``spec_hash``.

Mean and variance merge with Chan et al.'s pairwise update
(Chan, Golub, LeVeque, "Updating formulae and a pairwise algorithm for computing sample variances",
1979): ``n = na + nb; d = mb - ma; mean = ma + d*nb/n; M2 = M2a + M2b + d^2*na*nb/n``.
Counts and histograms merge exactly by addition, so ``merge`` is associative and commutative.

Why the update (the fold, with the C kernels when built) lives beside the encoding and the merge, and
why this module is one piece past 600 lines: the build folds its calibration data into the baseline
with the very same ``update`` the agent folds a window with, so the two cannot drift apart; splitting
accumulation from encoding would cut the profile classes in half. What stays on the device is the
buffering in front of the fold (``device_agent.windows``) and the kernels themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent import kernels
from device_agent.errors import AgentError

SCHEMA = 1
DEFAULT_BINS = 20
# Inputs with at most this many elements per sample are profiled element by element (tabular data,
# small images such as 8x8 digits); larger images get per-channel summaries instead.
ELEMENT_LIMIT = 256
CONFIDENCE_EDGES = tuple(float(x) for x in np.linspace(0.0, 1.0, 21))
# Log-spaced latency bins from 10 us to 10 s.
LATENCY_EDGES_MS = tuple(float(x) for x in np.round(np.logspace(-2, 4, 25), 6))
# Wire precision for float summaries (min/max are kept exactly): 10 significant digits.
FLOAT_DIGITS = 10
# A window's ground-truth counts carry a (true, predicted) confusion matrix up to this many labels
# (32 x 32 counts stay a few KB of JSON); above it only the labelled and correct counts.
CONFUSION_MAX_LABELS = 32


class StatsError(AgentError, ValueError):
    """A profile or spec is malformed or two profiles cannot be merged."""


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _round(v: float) -> float | None:
    if not math.isfinite(v):
        return None
    return float(f"{v:.{FLOAT_DIGITS}g}")


def make_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> list[list[float]]:
    """Return per-feature quantile bin edges for a (n, F) float array, duplicates removed.

    Quantile edges put about the same share of the baseline in every bin, which keeps PSI and JS
    stable for skewed features. A feature with a single distinct value gets edges ``[v, v + w]``
    so any other value lands in the under- or overflow bin.
    """
    if values.ndim != 2:
        raise StatsError(f"make_edges wants a (samples, features) array, got shape {values.shape}")
    if bins < 1:
        raise StatsError(f"bins must be >= 1, got {bins}")
    qs = np.linspace(0.0, 1.0, bins + 1)
    out: list[list[float]] = []
    for j in range(values.shape[1]):
        col = values[:, j].astype(np.float64)
        col = col[np.isfinite(col)]
        if col.size == 0:
            out.append([0.0, 1.0])
            continue
        e = np.unique(np.quantile(col, qs))
        if e.size < 2:
            v = float(e[0])
            e = np.array([v, v + max(abs(v) * 1e-6, 1e-9)])
        out.append([float(x) for x in e])
    return out


@dataclass
class FeatureSetProfile:
    """Fixed-bin histograms plus moments for F features, updated in batches.

    ``edges`` is (F, Bmax+1) padded with +inf past each feature's own ``nedges[f]`` edges, so one
    vectorised comparison bins every feature at once.
    """

    names: list[str]
    edges: np.ndarray  # (F, Bmax+1) float64, +inf padded
    nedges: np.ndarray  # (F,) int64
    counts: np.ndarray  # (F, Bmax+2) int64
    count: np.ndarray  # (F,) int64, finite values seen
    nan_count: np.ndarray  # (F,) int64
    min: np.ndarray  # (F,) float64, +inf when empty
    max: np.ndarray  # (F,) float64, -inf when empty
    mean: np.ndarray  # (F,) float64
    m2: np.ndarray  # (F,) float64, sum of squared deviations

    @classmethod
    def empty(cls, names: Sequence[str], edges: Sequence[Sequence[float]]) -> FeatureSetProfile:
        """Return an empty profile for the given feature names and per-feature edges."""
        if len(names) != len(edges):
            raise StatsError(f"{len(names)} feature names but {len(edges)} edge lists")
        if len(names) == 0:
            raise StatsError("a profile needs at least one feature")
        nedges = np.array([len(e) for e in edges], dtype=np.int64)
        if (nedges < 2).any():
            raise StatsError("every feature needs at least 2 bin edges")
        bmax = int(nedges.max())
        pad = np.full((len(names), bmax), np.inf)
        for i, e in enumerate(edges):
            arr = np.asarray(e, dtype=np.float64)
            if not np.isfinite(arr).all() or not (np.diff(arr) > 0).all():
                raise StatsError(f"edges of feature {names[i]!r} must be finite and strictly increasing")
            pad[i, : arr.size] = arr
        return cls._zeroed(list(names), pad, nedges)

    @classmethod
    def _zeroed(cls, names: list[str], edges: np.ndarray, nedges: np.ndarray) -> FeatureSetProfile:
        f = len(names)
        return cls(
            names=names,
            edges=edges,
            nedges=nedges,
            counts=np.zeros((f, edges.shape[1] + 1), dtype=np.int64),
            count=np.zeros(f, dtype=np.int64),
            nan_count=np.zeros(f, dtype=np.int64),
            min=np.full(f, np.inf),
            max=np.full(f, -np.inf),
            mean=np.zeros(f),
            m2=np.zeros(f),
        )

    def empty_like(self) -> FeatureSetProfile:
        """Return an empty profile with this one's names and (shared, read-only) edges."""
        return self._zeroed(self.names, self.edges, self.nedges)

    @property
    def n_features(self) -> int:
        return len(self.names)

    def edge_list(self, j: int) -> list[float]:
        """Return feature j's real (unpadded) edges."""
        return [float(x) for x in self.edges[j, : self.nedges[j]]]

    def hist(self, j: int) -> np.ndarray:
        """Return feature j's counts: underflow, the regular bins, overflow (length nedges+1)."""
        return self.counts[j, : self.nedges[j] + 1].copy()

    def update(self, values: np.ndarray) -> None:
        """Add a batch of samples, shape (n, F) (or (F,) for one sample)."""
        x = np.asarray(values, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise StatsError(f"expected (n, {self.n_features}) values, got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if kernels.NATIVE:
            try:  # the same result to the bit (device_agent/_kernels.c, profile_update)
                kernels.profile_update(
                    np.ascontiguousarray(x),
                    self.edges,
                    self.nedges,
                    self.counts,
                    self.count,
                    self.nan_count,
                    self.min,
                    self.max,
                    self.mean,
                    self.m2,
                )
                return
            except (ValueError, TypeError, BufferError):
                pass  # arrays it cannot update in place (read-only views): nothing was changed
        finite = np.isfinite(x)
        all_finite = bool(finite.all())
        if not all_finite:
            self.nan_count += (~finite).sum(axis=0)
        xf = x if all_finite else np.where(finite, x, np.nan)
        # Bin index: number of edges <= x (0 = underflow, nedges = overflow); the right edge belongs
        # to the last bin. NaN compares False everywhere and is masked out below.
        # One (F, n) comparison per edge column, accumulated: about 4x faster than reducing an
        # (n, F, E) comparison over its short last axis. Padding edges are +inf (never <= x).
        xt = np.ascontiguousarray(xf.T)
        acc = np.zeros(xt.shape, dtype=np.int32)
        for e in range(self.edges.shape[1]):
            acc += xt >= self.edges[:, e : e + 1]
        idx = acc.T
        last = self.edges[np.arange(self.n_features), self.nedges - 1]
        idx = np.where((idx == self.nedges[None, :]) & (xf == last[None, :]), idx - 1, idx)
        width = self.counts.shape[1]
        flat = np.arange(self.n_features)[None, :] * width + idx
        flat = flat.ravel() if all_finite else flat[finite]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        if all_finite:  # the common case: plain reductions, the same values as the NaN-aware ones
            n = x.shape[0]
            bmean = x.sum(axis=0) / n
            bm2 = ((x - bmean[None, :]) ** 2).sum(axis=0)
            self.min = np.fmin(self.min, x.min(axis=0))
            self.max = np.fmax(self.max, x.max(axis=0))
            nb = np.full(self.n_features, n, dtype=np.int64)
            self.mean, self.m2 = _chan(self.count, self.mean, self.m2, nb, bmean, bm2)
            self.count = self.count + nb
            return
        nb = finite.sum(axis=0)
        has = nb > 0
        if not has.any():
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            bmean = np.where(has, np.nansum(xf, axis=0) / np.maximum(nb, 1), 0.0)
            bm2 = np.nansum((xf - bmean[None, :]) ** 2, axis=0)
            self.min = np.where(
                has, np.fmin(self.min, np.nanmin(np.where(finite, xf, np.inf), axis=0)), self.min
            )
            self.max = np.where(
                has, np.fmax(self.max, np.nanmax(np.where(finite, xf, -np.inf), axis=0)), self.max
            )
        self.mean, self.m2 = _chan(self.count, self.mean, self.m2, nb, bmean, bm2)
        self.count = self.count + nb

    def merge(self, other: FeatureSetProfile) -> FeatureSetProfile:
        """Return a new profile holding both; edges and names must be identical."""
        self.check_compatible(other)
        mean, m2 = _chan(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return FeatureSetProfile(
            names=list(self.names),
            edges=self.edges.copy(),
            nedges=self.nedges.copy(),
            counts=self.counts + other.counts,
            count=self.count + other.count,
            nan_count=self.nan_count + other.nan_count,
            min=np.fmin(self.min, other.min),
            max=np.fmax(self.max, other.max),
            mean=mean,
            m2=m2,
        )

    def check_compatible(self, other: FeatureSetProfile) -> None:
        """Raise StatsError unless both profiles share names and edges."""
        if self.names != other.names:
            raise StatsError("profiles have different feature names; they come from different baselines")
        if self.edges is other.edges:
            return
        if self.edges.shape != other.edges.shape or not np.array_equal(self.edges, other.edges):
            raise StatsError("profiles have different bin edges; they come from different baselines")

    def variance(self) -> np.ndarray:
        """Return the population variance per feature (0 where fewer than 2 values)."""
        return np.where(self.count > 1, self.m2 / np.maximum(self.count, 1), 0.0)

    def std(self) -> np.ndarray:
        """Return the population standard deviation per feature."""
        return np.sqrt(self.variance())

    def state_dict(self) -> dict[str, Any]:
        """Return the mergeable state as JSON-ready lists (no names or edges)."""
        return {
            "count": [int(v) for v in self.count],
            "nan": [int(v) for v in self.nan_count],
            "min": [_finite_or_none(v) for v in self.min],
            "max": [_finite_or_none(v) for v in self.max],
            "mean": [_round(v) for v in self.mean],
            "m2": [_round(v) for v in self.m2],
            "hist": [[int(c) for c in self.hist(j)] for j in range(self.n_features)],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Fill this (empty) profile from ``state_dict()`` output, validating every length and value."""
        keys = {"count", "nan", "min", "max", "mean", "m2", "hist"}
        if set(state) != keys:
            raise StatsError(f"profile state keys {sorted(state)} != {sorted(keys)}")
        f = self.n_features
        for k in keys - {"hist"}:
            if not isinstance(state[k], list) or len(state[k]) != f:
                raise StatsError(f"profile field {k!r} must be a list of {f} values")
        count = _ints(state["count"], "count")
        nan = _ints(state["nan"], "nan")
        hist = state["hist"]
        if not isinstance(hist, list) or len(hist) != f:
            raise StatsError(f"profile field 'hist' must hold {f} histograms")
        counts = np.zeros_like(self.counts)
        for j, h in enumerate(hist):
            want = int(self.nedges[j]) + 1
            if not isinstance(h, list) or len(h) != want:
                raise StatsError(
                    f"histogram of feature {self.names[j]!r} has {len(h) if isinstance(h, list) else '?'} "
                    f"bins, the baseline has {want}"
                )
            counts[j, :want] = _ints(h, "hist")
            if counts[j].sum() != count[j]:
                raise StatsError(
                    f"histogram of feature {self.names[j]!r} sums to {counts[j].sum()}, count is {count[j]}"
                )
        self.counts = counts
        self.count = count
        self.nan_count = nan
        self.min = _floats(state["min"], "min", np.inf)
        self.max = _floats(state["max"], "max", -np.inf)
        self.mean = _floats(state["mean"], "mean", 0.0)
        self.m2 = _floats(state["m2"], "m2", 0.0)
        if (self.m2 < 0).any():
            raise StatsError("profile field 'm2' must not be negative")


def _ints(vals: Any, name: str) -> np.ndarray:
    if not isinstance(vals, list) or not all(type(v) is int for v in vals):
        bad = next((v for v in vals if type(v) is not int), vals) if isinstance(vals, list) else vals
        raise StatsError(f"profile field {name!r} must hold non-negative integers, got {str(bad)[:20]!r}")
    try:
        arr = np.array(vals, dtype=np.int64)
    except OverflowError:
        raise StatsError(f"profile field {name!r} holds an integer too large for a count") from None
    if arr.size and arr.min() < 0:
        raise StatsError(f"profile field {name!r} must hold non-negative integers, got {int(arr.min())}")
    return arr


_NUMBER_TYPES = (int, float)


def _floats(vals: Any, name: str, none_value: float) -> np.ndarray:
    if not isinstance(vals, list) or not all(v is None or type(v) in _NUMBER_TYPES for v in vals):
        raise StatsError(f"profile field {name!r} must hold finite numbers or null")
    arr = np.array([none_value if v is None else v for v in vals], dtype=np.float64)
    nulls = np.array([v is None for v in vals], dtype=bool)
    if not np.isfinite(arr[~nulls]).all():
        raise StatsError(f"profile field {name!r} must hold finite numbers or null")
    return arr


def _copy_fsp(p: FeatureSetProfile) -> FeatureSetProfile:
    return FeatureSetProfile(
        names=p.names,  # shared, never mutated
        edges=p.edges,  # shared, never mutated
        nedges=p.nedges,
        counts=p.counts.copy(),
        count=p.count.copy(),
        nan_count=p.nan_count.copy(),
        min=p.min.copy(),
        max=p.max.copy(),
        mean=p.mean.copy(),
        m2=p.m2.copy(),
    )


def _chan(
    na: np.ndarray, ma: np.ndarray, m2a: np.ndarray, nb: np.ndarray, mb: np.ndarray, m2b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Combine two sets of (count, mean, M2) with Chan et al.'s pairwise formula."""
    na = np.asarray(na, dtype=np.float64)
    nb = np.asarray(nb, dtype=np.float64)
    n = na + nb
    safe = np.maximum(n, 1.0)
    d = mb - ma
    mean = np.where(n > 0, ma + d * nb / safe, 0.0)
    m2 = np.where(n > 0, m2a + m2b + d * d * na * nb / safe, 0.0)
    return mean, m2


# --------------------------------------------------------------------------------------------------
# Feature extraction: what a "feature" is for a given model input.


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product of each row of ``a`` with ``b`` (a row of the same length, or a vector)."""
    if _vecdot is not None:
        return np.asarray(_vecdot(a, b))
    return np.einsum("ij,ij->i", a, np.broadcast_to(b, a.shape))  # numpy < 2 (older Raspberry Pi OS)


_vecdot = kernels.vecdot
_ones = kernels.ones_f32
_clip_ufunc = kernels.clip_ufunc


def summary_features(summaries: Any, size: int) -> np.ndarray:
    """Rows of (min, max, sum, sum of squares) of image channels of ``size`` values -> rows of
    (mean, std, min, max) float64: the one formula every image-summary path uses (``extract``,
    and the statistics window for single samples)."""
    s = np.asarray(summaries, dtype=np.float64).reshape(-1, 4)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = s[:, 2] / size
        std = np.sqrt(np.maximum(s[:, 3] / size - mean * mean, 0.0))
    return np.stack([mean, std, s[:, 0], s[:, 1]], axis=1)


@dataclass(frozen=True)
class FeatureSpec:
    """How raw model inputs become profiled features.

    ``kind`` is ``"elements"`` (every element of a sample is a feature: tabular data, small images)
    or ``"image_summary"`` (per channel: mean, std, min and max of each sample; for large images).
    ``input_shape`` is the per-sample shape without the batch axis.
    """

    kind: str
    input_shape: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def for_input(cls, input_shape: Sequence[int], feature_names: Sequence[str] | None = None) -> FeatureSpec:
        """Choose the feature kind for a per-sample input shape (no batch axis)."""
        shape = tuple(int(d) for d in input_shape)
        n = int(np.prod(shape)) if shape else 1
        if feature_names is not None and len(feature_names) != n:
            raise StatsError(f"{len(feature_names)} feature names for an input of {n} elements")
        if n <= ELEMENT_LIMIT or len(shape) < 2:
            if feature_names is not None:
                names = tuple(str(s) for s in feature_names)
            elif len(shape) <= 1:
                names = tuple(f"f{i}" for i in range(n))
            else:
                names = tuple("px_" + "_".join(str(int(k)) for k in idx) for idx in np.ndindex(*shape))
            return cls("elements", shape, names)
        channels = shape[-1] if len(shape) >= 3 else 1
        names = tuple(f"c{c}_{s}" for c in range(channels) for s in ("mean", "std", "min", "max"))
        return cls("image_summary", shape, names)

    def extract(self, x: np.ndarray) -> np.ndarray:
        """Map a batch (n, *input_shape) to features (n, F) float64."""
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self.input_shape:
            raise StatsError(f"input shape {tuple(x.shape[1:])} != profiled shape {self.input_shape}")
        n = x.shape[0]
        if self.kind == "elements":
            return x.reshape(n, -1).astype(np.float64, copy=False)
        if self.kind == "image_summary":
            # Stay in the input's float32 (no float64 copy of every pixel) and reduce each image's
            # channel over a contiguous row. Every row is reduced on its own (the native kernel, or
            # numpy's per-row dot products and SIMD min/max), so a sample gets the same features
            # alone or in any batch.
            x = x.astype(np.float32, copy=False)
            channels = self.input_shape[-1] if len(self.input_shape) >= 3 else 1
            if channels == 1:
                rows = np.ascontiguousarray(x.reshape(n, -1))  # (n, P): one row per image
            else:  # channel-first and contiguous: one row per (image, channel)
                rows = np.ascontiguousarray(x.reshape(n, -1, channels).transpose(0, 2, 1)).reshape(
                    n * channels, -1
                )
            size = rows.shape[1]
            if kernels.NATIVE:
                summaries: Any = [kernels.summary(row) for row in rows]
            else:
                summaries = np.stack(
                    [rows.min(axis=1), rows.max(axis=1), _rowdot(rows, _ones(size)), _rowdot(rows, rows)],
                    axis=1,
                )
            return summary_features(summaries, size).reshape(n, -1)
        raise StatsError(f"unknown feature kind {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.input_shape), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        if set(d) != {"kind", "input_shape", "names"}:
            raise StatsError(f"feature spec keys {sorted(d)} != ['input_shape', 'kind', 'names']")
        if d["kind"] not in ("elements", "image_summary"):
            raise StatsError(f"unknown feature kind {d['kind']!r}")
        return cls(str(d["kind"]), tuple(int(v) for v in d["input_shape"]), tuple(str(v) for v in d["names"]))


# --------------------------------------------------------------------------------------------------
# Ground truth: labels that arrived for earlier predictions (``POST /v1/feedback`` on the agent).


@dataclass
class Feedback:
    """Counts of labelled predictions: how many, how many were right, and who was taken for whom.

    ``confusion[t, p]`` counts predictions of label index ``p`` whose true label was ``t`` (None for
    models with more than ``CONFUSION_MAX_LABELS`` labels). Merges add every count, so they are exact,
    associative and commutative; ``correct`` is the confusion matrix's trace when it has one.
    """

    labelled: int = 0
    correct: int = 0
    confusion: np.ndarray | None = None  # (K, K) int64, rows true label, columns predicted

    @classmethod
    def empty(cls, n_labels: int) -> Feedback:
        """No labels yet, for a model with ``n_labels`` classes."""
        conf = np.zeros((n_labels, n_labels), dtype=np.int64) if n_labels <= CONFUSION_MAX_LABELS else None
        return cls(0, 0, conf)

    def add(self, true_index: int, predicted_index: int) -> bool:
        """Count one label for a prediction; return True when the prediction was right."""
        right = int(true_index) == int(predicted_index)
        self.labelled += 1
        self.correct += int(right)
        if self.confusion is not None:
            self.confusion[true_index, predicted_index] += 1
        return right

    def merge(self, other: Feedback | None) -> Feedback:
        """Return the sum of both (either may be None or empty)."""
        if other is None:
            return Feedback(
                self.labelled, self.correct, None if self.confusion is None else self.confusion.copy()
            )
        a, b = self.confusion, other.confusion
        if a is not None and b is not None:
            if a.shape != b.shape:
                raise StatsError("feedback confusion matrices have different shapes; different label sets")
            conf: np.ndarray | None = a + b
        elif a is None and b is None:
            conf = None
        elif (a is None and self.labelled) or (b is None and other.labelled):
            raise StatsError("feedback counts disagree on having a confusion matrix; different label sets")
        else:
            conf = (a if a is not None else b).copy()  # type: ignore[union-attr]
        return Feedback(self.labelled + other.labelled, self.correct + other.correct, conf)

    @property
    def accuracy(self) -> float | None:
        """Share of labelled predictions that were right; None without labels."""
        return self.correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"labelled", "correct", "confusion"}`` (confusion a list of rows or null)."""
        return {
            "labelled": int(self.labelled),
            "correct": int(self.correct),
            "confusion": None if self.confusion is None else [[int(v) for v in r] for r in self.confusion],
        }

    @classmethod
    def from_dict(cls, d: Any, n_labels: int | None = None) -> Feedback:
        """Validate and load ``to_dict`` output; with ``n_labels`` the matrix must be that size."""
        if not isinstance(d, Mapping) or set(d) != {"labelled", "correct", "confusion"}:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise StatsError(f"feedback keys {got} != ['confusion', 'correct', 'labelled']")
        labelled, correct = (_ints([d[k]], f"feedback.{k}")[0] for k in ("labelled", "correct"))
        if correct > labelled:
            raise StatsError(f"feedback.correct {correct} exceeds feedback.labelled {labelled}")
        conf = None
        if d["confusion"] is not None:
            rows = d["confusion"]
            k = len(rows) if isinstance(rows, list) else -1
            if k < 1 or (n_labels is not None and k != n_labels) or k > CONFUSION_MAX_LABELS:
                want = n_labels if n_labels is not None else f"1..{CONFUSION_MAX_LABELS}"
                raise StatsError(f"feedback.confusion must be a {want} x {want} list of counts")
            if not all(isinstance(r, list) and len(r) == k for r in rows):
                raise StatsError(f"feedback.confusion must be a {k} x {k} list of counts")
            conf = np.stack([_ints(r, "feedback.confusion") for r in rows])
            if int(conf.sum()) != labelled or int(np.trace(conf)) != correct:
                raise StatsError("feedback.confusion does not add up to feedback.labelled and .correct")
        elif n_labels is not None and n_labels <= CONFUSION_MAX_LABELS and labelled:
            raise StatsError(f"feedback.confusion is missing (the model has {n_labels} labels)")
        return cls(int(labelled), int(correct), conf)


# --------------------------------------------------------------------------------------------------
# The full profile of a model: inputs, outputs, latency, schema violations.


@dataclass
class ProfileSpec:
    """The frozen part of a profile: feature spec, input edges, labels, output/latency edges."""

    features: FeatureSpec
    input_edges: list[list[float]]
    labels: list[str]
    confidence_edges: list[float] = field(default_factory=lambda: list(CONFIDENCE_EDGES))
    latency_edges_ms: list[float] = field(default_factory=lambda: list(LATENCY_EDGES_MS))
    # Optional: a scalar per sample and output (a regression's prediction in the user's units, an
    # anomaly score), profiled with these names and edges frozen from the baseline. None for
    # classifiers, whose specs (and hashes) stay what they were before the field existed.
    value_names: list[str] | None = None
    value_edges: list[list[float]] | None = None

    def new_profile(self) -> Profile:
        """Return an empty profile with this spec's edges (validated once, then copied).

        Treat a spec as immutable once used: its template and hash are cached.
        """
        tpl = self.__dict__.get("_template")
        if tpl is None:
            tpl = self._build_profile()
            self.__dict__["_template"] = tpl
        return Profile(
            spec=self,
            inputs=_copy_fsp(tpl.inputs),
            class_counts=tpl.class_counts.copy(),
            confidence=_copy_fsp(tpl.confidence),
            latency_ms=_copy_fsp(tpl.latency_ms),
            schema_violations={},
            values=None if tpl.values is None else _copy_fsp(tpl.values),
        )

    @property
    def has_values(self) -> bool:
        """Whether profiles of this spec carry the per-sample scalar outputs (``Profile.values``)."""
        return self.value_names is not None

    def _build_profile(self) -> Profile:
        values = None
        if self.value_names is not None:
            if self.value_edges is None:
                raise StatsError("profile spec has value names but no value edges")
            values = FeatureSetProfile.empty(self.value_names, self.value_edges)
        return Profile(
            spec=self,
            inputs=FeatureSetProfile.empty(self.features.names, self.input_edges),
            class_counts=np.zeros(len(self.labels), dtype=np.int64),
            confidence=FeatureSetProfile.empty(["top1_confidence"], [self.confidence_edges]),
            latency_ms=FeatureSetProfile.empty(["latency_ms"], [self.latency_edges_ms]),
            schema_violations={},
            values=values,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "features": self.features.to_dict(),
            "input_edges": [list(map(float, e)) for e in self.input_edges],
            "labels": list(self.labels),
            "confidence_edges": list(self.confidence_edges),
            "latency_edges_ms": list(self.latency_edges_ms),
        }
        if self.value_names is not None:  # only when present: classifier specs hash as before
            d["values"] = {
                "names": list(self.value_names),
                "edges": [list(map(float, e)) for e in self.value_edges or []],
            }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProfileSpec:
        keys = {"features", "input_edges", "labels", "confidence_edges", "latency_edges_ms"}
        if set(d) - {"values"} != keys:
            raise StatsError(f"profile spec keys {sorted(d)} != {sorted(keys)} (and optionally 'values')")
        names = edges = None
        if "values" in d:
            v = d["values"]
            if (
                not isinstance(v, Mapping)
                or set(v) != {"names", "edges"}
                or not isinstance(v["names"], list)
                or not isinstance(v["edges"], list)
                or not all(isinstance(e, list) for e in v["edges"])
            ):
                raise StatsError("profile spec 'values' must be {'names': [...], 'edges': [[...], ...]}")
            names = [str(n) for n in v["names"]]
            edges = [[float(x) for x in e] for e in v["edges"]]
        spec = cls(
            features=FeatureSpec.from_dict(d["features"]),
            input_edges=[[float(v) for v in e] for e in d["input_edges"]],
            labels=[str(v) for v in d["labels"]],
            confidence_edges=[float(v) for v in d["confidence_edges"]],
            latency_edges_ms=[float(v) for v in d["latency_edges_ms"]],
            value_names=names,
            value_edges=edges,
        )
        if len(spec.input_edges) != len(spec.features.names):
            raise StatsError("profile spec has a different number of edge lists and feature names")
        spec.new_profile()  # validates edges
        return spec

    def spec_hash(self) -> str:
        """Return a sha256 of the canonical spec; windows carry it so the collector can match baselines."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
            cached = self.__dict__["_hash"] = hashlib.sha256(blob).hexdigest()
        return str(cached)


@dataclass
class Profile:
    """A mergeable profile of one window (or of the baseline)."""

    spec: ProfileSpec
    inputs: FeatureSetProfile
    class_counts: np.ndarray
    confidence: FeatureSetProfile
    latency_ms: FeatureSetProfile
    schema_violations: dict[str, int]
    # Labels that arrived for predictions while this window was open (None: none came).
    feedback: Feedback | None = None
    # The per-sample scalar outputs (see ``ProfileSpec.value_names``); None for classifiers.
    values: FeatureSetProfile | None = None

    @property
    def count(self) -> int:
        """Return the number of predictions (samples with outputs) in this profile."""
        if self.values is not None:  # a scalar-output model: every prediction is one row of values
            return int(self.values.count[0] + self.values.nan_count[0])
        return int(self.class_counts.sum())

    def update_inputs(self, x: np.ndarray) -> None:
        """Add a batch of raw model inputs (n, *input_shape)."""
        self.inputs.update(self.spec.features.extract(x))

    def update_outputs(self, probs: np.ndarray) -> None:
        """Add a batch of output scores (n, K): predicted class counts and top-1 confidence.

        Scores that do not sum to 1 (logits) go through a softmax first.
        """
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 1:
            p = p[None, :]
        if p.ndim != 2 or p.shape[1] != self.class_counts.size:
            raise StatsError(f"expected (n, {self.class_counts.size}) output scores, got shape {p.shape}")
        if p.shape[0] == 0:
            return
        if kernels.fold_outputs is not None and p.flags.c_contiguous and self.class_counts.flags.writeable:
            # Probabilities in one C pass (the same counts and confidences as below, to the bit);
            # False leaves logits and borderline rows to numpy.
            conf = np.empty(p.shape[0])
            try:
                done = kernels.fold_outputs(p, self.class_counts, conf)
            except (TypeError, ValueError, BufferError):  # counts it cannot update in place
                done = False
            if done:
                self.confidence.update(conf[:, None])
                return
        p = as_probabilities(p)
        top = p.argmax(axis=1)
        self.class_counts += np.bincount(top, minlength=self.class_counts.size)
        self.confidence.update(p.max(axis=1)[:, None])

    def update_values(self, values: np.ndarray) -> None:
        """Add a batch of per-sample scalar outputs, shape (n, V) or (n,) for one value per sample.

        The values profile replaces the class counts and top-1 confidence for models whose output
        is a number (regression: the prediction in the user's units; anomaly: the score).
        """
        if self.values is None:
            raise StatsError("this profile's spec has no values (a classifier's profile)")
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            v = v[:, None]
        self.values.update(v)

    def update_latency(self, latency_ms: float | np.ndarray) -> None:
        """Add one or more latency measurements in milliseconds."""
        self.latency_ms.update(np.atleast_1d(np.asarray(latency_ms, dtype=np.float64))[:, None])

    def add_violation(self, kind: str, n: int = 1) -> None:
        """Count ``n`` refused inputs of a kind (``shape``, ``dtype``, ``nan``, ...)."""
        self.schema_violations[kind] = self.schema_violations.get(kind, 0) + int(n)

    def add_label(self, true_index: int, predicted_index: int) -> bool:
        """Count the true label of one earlier prediction; return True when it was right."""
        if self.feedback is None:
            self.feedback = Feedback.empty(len(self.spec.labels))
        return self.feedback.add(true_index, predicted_index)

    def merge(self, other: Profile) -> Profile:
        """Return a new profile holding both windows (same spec required)."""
        if self.spec.spec_hash() != other.spec.spec_hash():
            raise StatsError("profiles come from different baselines (spec hashes differ)")
        viol = dict(self.schema_violations)
        for k, v in other.schema_violations.items():
            viol[k] = viol.get(k, 0) + v
        fb = other.feedback if self.feedback is None else self.feedback.merge(other.feedback)
        return Profile(
            spec=self.spec,
            inputs=self.inputs.merge(other.inputs),
            class_counts=self.class_counts + other.class_counts,
            confidence=self.confidence.merge(other.confidence),
            latency_ms=self.latency_ms.merge(other.latency_ms),
            schema_violations=viol,
            feedback=None if fb is None else fb.merge(None),
            values=None if self.values is None or other.values is None else self.values.merge(other.values),
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the mergeable state (what a telemetry window carries), without the spec.

        ``feedback`` is there only when labels arrived, so profiles without them (every baseline)
        keep the form older readers know.
        """
        out = {
            "inputs": self.inputs.state_dict(),
            "class_counts": [int(v) for v in self.class_counts],
            "confidence": self.confidence.state_dict(),
            "latency_ms": self.latency_ms.state_dict(),
            "schema_violations": {str(k): int(v) for k, v in sorted(self.schema_violations.items())},
        }
        if self.feedback is not None and self.feedback.labelled:
            out["feedback"] = self.feedback.to_dict()
        if self.values is not None:
            out["values"] = self.values.state_dict()
        return out

    @classmethod
    def from_state(cls, spec: ProfileSpec, state: Mapping[str, Any]) -> Profile:
        """Rebuild a profile from ``state_dict()`` output and its spec, validating strictly."""
        keys = {"inputs", "class_counts", "confidence", "latency_ms", "schema_violations"}
        if spec.has_values:
            keys.add("values")
        if not isinstance(state, Mapping) or set(state) - {"feedback"} != keys:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise StatsError(f"profile keys {got} != {sorted(keys)} (and optionally 'feedback')")
        prof = spec.new_profile()
        sets = ("inputs", "confidence", "latency_ms") + (("values",) if spec.has_values else ())
        for name in sets:
            if not isinstance(state[name], Mapping):
                raise StatsError(f"profile field {name!r} must be an object")
            getattr(prof, name).load_state(state[name])
        cc = state["class_counts"]
        if not isinstance(cc, list) or len(cc) != len(spec.labels):
            raise StatsError(f"class_counts must be a list of {len(spec.labels)} counts")
        prof.class_counts = _ints(cc, "class_counts")
        sv = state["schema_violations"]
        if not isinstance(sv, Mapping):
            raise StatsError("schema_violations must be an object")
        for k, v in sv.items():
            if (
                not isinstance(k, str)
                or len(k) > 64
                or isinstance(v, bool)
                or not isinstance(v, int)
                or v < 0
            ):
                raise StatsError("schema_violations must map short names to non-negative integers")
        prof.schema_violations = {str(k): int(v) for k, v in sv.items()}
        if "feedback" in state:
            prof.feedback = Feedback.from_dict(state["feedback"], len(spec.labels))
        return prof


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Return rows that sum to 1: pass probabilities through, softmax anything else (logits)."""
    p = np.asarray(scores, dtype=np.float64)
    sums = p.sum(axis=1)
    # np.all(p >= -1e-6) and np.allclose(sums, 1.0, atol=2e-2), in two reductions (NaN and
    # infinities fail both forms alike); this runs on every fold of a statistics window.
    if p.size and float(p.min()) >= -1e-6 and float(np.abs(sums - 1.0).max()) <= 2e-2 + 1e-5:
        return _clip_ufunc(p, 0.0, 1.0)
    z = p - p.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# baseline.json


BASELINE_SCHEMA = 1


def build_baseline(
    x: np.ndarray,
    probs: np.ndarray | None,
    labels: Sequence[str],
    feature_names: Sequence[str] | None = None,
    bins: int = DEFAULT_BINS,
    latency_ms: Sequence[float] | None = None,
    values: np.ndarray | None = None,
    value_names: Sequence[str] | None = None,
) -> Profile:
    """Profile a reference data set: freeze edges from ``x`` (n, *shape), then add ``x`` and ``probs``.

    A model whose output is a number passes ``values`` (n, V) (or (n,)) instead of ``probs``: its
    edges are frozen from them too and they fill ``Profile.values`` (``value_names``, default
    ``value``, ``value_1``, ...); the class counts and confidence stay empty.
    """
    features = FeatureSpec.for_input(x.shape[1:], feature_names)
    feats = features.extract(x)
    vnames: list[str] | None = None
    vedges: list[list[float]] | None = None
    v: np.ndarray | None = None
    if values is not None:
        v = np.asarray(values, dtype=np.float64)
        v = v[:, None] if v.ndim == 1 else v
        vnames = (
            [str(n) for n in value_names]
            if value_names is not None
            else (["value"] if v.shape[1] == 1 else [f"value_{i}" for i in range(v.shape[1])])
        )
        vedges = make_edges(v, bins)
    spec = ProfileSpec(
        features=features,
        input_edges=make_edges(feats, bins),
        labels=[str(v) for v in labels],
        value_names=vnames,
        value_edges=vedges,
    )
    prof = spec.new_profile()
    prof.inputs.update(feats)
    if v is not None:
        prof.update_values(v)
    if probs is not None:
        prof.update_outputs(probs)
    if latency_ms is not None and len(latency_ms):
        prof.update_latency(np.asarray(latency_ms))
    return prof


def baseline_to_dict(profile: Profile, source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the ``baseline.json`` document: schema, spec, spec hash, state and a note of the source."""
    return {
        "schema": BASELINE_SCHEMA,
        "spec": profile.spec.to_dict(),
        "spec_hash": profile.spec.spec_hash(),
        "profile": profile.state_dict(),
        "source": dict(source or {}),
    }


def baseline_from_dict(doc: Mapping[str, Any]) -> Profile:
    """Load a ``baseline.json`` document, checking its schema and spec hash."""
    if not isinstance(doc, Mapping):
        raise StatsError("baseline must be a JSON object")
    if doc.get("schema") != BASELINE_SCHEMA:
        raise StatsError(f"baseline schema {doc.get('schema')!r} is not supported (want {BASELINE_SCHEMA})")
    keys = {"schema", "spec", "spec_hash", "profile", "source"}
    if set(doc) != keys:
        raise StatsError(f"baseline keys {sorted(doc)} != {sorted(keys)}")
    spec = ProfileSpec.from_dict(doc["spec"])
    if spec.spec_hash() != doc["spec_hash"]:
        raise StatsError("baseline spec_hash does not match its spec; the file was edited or damaged")
    return Profile.from_state(spec, doc["profile"])
