"""Statistics windows: a Profile per window, fed in batches so profiling stays cheap.

A window turns each prediction's inputs into profiled features as it records them (the elements
themselves, or for large images a per-channel summary; for a single sample, from the sums the
input's one-pass check computed, turned into features at the next fold) and buffers those
features with the scores and latencies. Every
``FLUSH_ROWS`` samples, and when it closes, it folds the buffer into its
``device_agent.formats.stats.Profile`` (numpy costs per call, not per row). Windows are made from the
bundle's baseline spec (``spec.new_profile()``), so they merge and compare with the baseline
exactly. Not thread-safe: the Agent holds a lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent import kernels
from device_agent.formats.stats import Profile, ProfileSpec, summary_features
from device_agent.formats.telemetry import ModelRef
from device_agent.kernels import Summary

# Rows buffered between folds for element features: as many as fit in FEATS_BUFFER_BYTES, within
# [MIN_FLUSH_ROWS, FLUSH_ROWS]. Each fold has a fixed cost of a few numpy calls, which 1024 rows
# make small per sample (64 features: 512 KiB of buffer).
FLUSH_ROWS = 1024
MIN_FLUSH_ROWS = 256
FEATS_BUFFER_BYTES = 512 * 1024
# Per-channel image summaries are a few features per sample: as many rows, whatever the image size.
SUMMARY_FLUSH_ROWS = 1024


# For a bundle whose baseline profiles per-sample values (``ProfileSpec.has_values``: regression,
# anomaly), a function per task type that turns the model's float outputs (n, K) into the value(s)
# per sample (n, V); a task without one profiles the outputs themselves (regression: the
# predictions in the user's units). ``Agent`` sets the window's ``values_of`` from this table.
VALUE_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


@dataclass
class ClosedWindow:
    """A finished window: its profile, UTC bounds (POSIX seconds) and the model that produced it."""

    profile: Profile
    window_start: float
    window_end: float
    model: ModelRef

    @property
    def count(self) -> int:
        return self.profile.count


class Window:
    """An open statistics window."""

    def __init__(self, spec: ProfileSpec, model: ModelRef, start_ts: float, start_mono: float) -> None:
        self.spec = spec
        self.model = model
        self.start_ts = start_ts
        self.start_mono = start_mono
        self.profile = spec.new_profile()
        # Outputs (n, K) -> the scalar value(s) per sample (n, V) profiled for a spec with values;
        # None: the outputs are the values (a regression's predictions). Set by the agent.
        self.values_of: Callable[[np.ndarray], np.ndarray] | None = None
        self._elements = spec.features.kind == "elements"
        # Preallocated buffers: recording a sample is a few slice copies, no allocation.
        n_feats = len(spec.features.names)
        fit = FEATS_BUFFER_BYTES // (8 * max(1, n_feats))
        self._rows = max(MIN_FLUSH_ROWS, min(FLUSH_ROWS, fit)) if self._elements else SUMMARY_FLUSH_ROWS
        self._feats = np.empty((self._rows, n_feats), dtype=np.float64)
        self._scores = np.empty((self._rows, len(spec.labels)), dtype=np.float64)
        self._lat = np.empty(self._rows, dtype=np.float64)
        # The next free row: a (1,) int64 array, so that a bound runner reads and advances it in place.
        self._next = np.zeros(1, dtype=np.int64)
        self._flushed = 0
        # One-channel image summaries of single samples wait as (min, max, sum, sum of squares)
        # with their rows until the next fold turns them into features in one vectorized step.
        shape = spec.features.input_shape
        self._defer = not self._elements and not (len(shape) >= 3 and shape[-1] != 1)
        self._size = int(np.prod(shape)) if shape else 1
        self._summ = np.empty((self._rows if self._defer else 0, 4), dtype=np.float64)
        self._pending = np.zeros(self._rows if self._defer else 0, dtype=np.uint8)  # 1: row waits in _summ

    @property
    def rows(self) -> int:
        """Samples the buffers hold between folds."""
        return self._rows

    @property
    def count(self) -> int:
        """Predictions recorded so far (buffered ones included)."""
        return self._flushed + int(self._next[0])

    def record(self, x: np.ndarray, scores: np.ndarray, latency_ms: float) -> None:
        """Add a batch: model inputs (n, *shape) float, scores (n, K), and the batch's latency in ms.

        The batch latency is split evenly over its samples so latency counts match predictions.
        """
        n = int(scores.shape[0])
        if n > self._rows - int(self._next[0]):
            self.flush()
            if n > self._rows:  # a large batch goes straight into the profile
                self.profile.inputs.update(self.spec.features.extract(x))
                self._fold_outputs(scores)
                self.profile.update_latency(np.full(n, latency_ms / n))
                self._flushed += n
                return
        i = int(self._next[0])
        if self._elements:
            self._feats[i : i + n] = x.reshape(n, -1)
        else:
            self._feats[i : i + n] = self.spec.features.extract(x)
        self._scores[i : i + n] = scores
        self._lat[i : i + n] = latency_ms / n
        self._next[0] = i + n
        if i + n == self._rows:
            self.flush()

    def record_one(
        self,
        x: np.ndarray,
        scores: np.ndarray,
        latency_ms: float,
        summary: Summary | None = None,
        codes: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[int, float]:
        """Add one sample: input (1, *shape) float32, float32 scores (1, K) and its latency in ms.

        The per-prediction path of ``Agent.predict``: the scores and latency go into the buffers in
        one native call, which also returns the top-1 (index, score) the caller reports. ``summary``
        is the sample's (min, max, sum, sum of squares) (``Predictor.load_one``). With ``codes``
        (the output's raw 8-bit codes and their float32 table), that call first decodes them into
        ``scores``.
        """
        i = int(self._next[0])
        if codes is not None:
            top = kernels.decode_row(codes[0], codes[1], scores, self._scores, i, self._lat, latency_ms)
        else:
            top = kernels.store_row(scores, self._scores, i, self._lat, latency_ms)
        if self._elements:
            self._feats[i] = x.reshape(-1)
        elif summary is not None and self._defer:
            self._summ[i] = summary
            self._pending[i] = 1
        else:
            self._feats[i] = self.spec.features.extract(x)[0]
        self._next[0] = i + 1
        if i + 1 == self._rows:
            self.flush()
        return top

    def bind(self, runner: Any, lock: Any, cls: Any, labels: tuple[str, ...], ref: Any) -> bool:
        """Point a ``kernels.Runner`` at this window's row counter and buffers (see its ``bind``);
        False when the window's features are not a runner's (multi-channel image summaries). The
        runner then writes the counter's row, advances it, and calls ``flush`` when the buffers
        are full."""
        if self._elements:
            runner.bind(self, lock, self._next, self._feats, self._scores, self._lat, None, cls, labels, ref)
        elif self._defer:
            runner.bind(
                self, lock, self._next, self._summ, self._scores, self._lat, self._pending, cls, labels, ref
            )
        else:
            return False
        return True

    def add_violation(self, kind: str, n: int = 1) -> None:
        """Count a refused input of ``kind`` (shape, dtype, nan, json, ...)."""
        self.profile.add_violation(kind, n)

    def flush(self) -> None:
        """Fold buffered samples into the profile."""
        n = int(self._next[0])
        if not n:
            return
        if self._defer:
            rows = np.flatnonzero(self._pending[:n])
            if rows.size:
                self._feats[rows] = summary_features(self._summ[rows], self._size)
                self._pending[:n] = 0
        self.profile.inputs.update(self._feats[:n])
        self._fold_outputs(self._scores[:n])
        self.profile.update_latency(self._lat[:n])
        self._flushed += n
        self._next[0] = 0

    def _fold_outputs(self, scores: np.ndarray) -> None:
        """Fold a block of outputs: class counts and confidence for a classifier; for a model whose
        output is a number (``spec.has_values``), the scalar value per sample (``values_of`` of the
        outputs, the outputs themselves by default) into ``Profile.values``."""
        if self.profile.values is None:
            self.profile.update_outputs(scores)
        else:
            self.profile.update_values(scores if self.values_of is None else self.values_of(scores))

    def close(self, end_ts: float) -> ClosedWindow:
        """Flush and return the finished window."""
        self.flush()
        return ClosedWindow(self.profile, self.start_ts, max(end_ts, self.start_ts), self.model)
