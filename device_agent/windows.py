"""Statistics windows: a Profile per window, fed in small batches so profiling stays cheap.

A window buffers per-sample features (or raw images, for per-channel summaries), scores and
latencies and folds them into its ``device_agent.stats.Profile`` in batches (numpy costs per call,
not per row), and once more when it closes. Windows are made from the bundle's baseline spec
(``spec.new_profile()``), so they merge and compare with the baseline exactly.
Not thread-safe: the Agent holds a lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.stats import Profile, ProfileSpec
from device_agent.telemetry import ModelRef

FLUSH_ROWS = 256
# Inputs profiled as per-channel summaries (large images) are buffered raw and summarised a chunk
# at a time (numpy's per-call overhead dominates for one image); a chunk this size stays in the
# core's L2 cache beside the model, where a larger one would push the model's weights out.
RAW_CHUNK_BYTES = 512 * 1024


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
        self._elements = spec.features.kind == "elements"
        shape = tuple(spec.features.input_shape)
        sample_bytes = 4 * int(np.prod(shape)) if shape else 4
        # Preallocated buffers: recording a sample is a few slice copies, no allocation. Features,
        # scores and latencies are folded into the profile every FLUSH_ROWS samples; raw images
        # (image_summary) are turned into features every ``_chunk`` samples.
        self._rows = FLUSH_ROWS
        self._feats = np.empty((self._rows, len(spec.features.names)), dtype=np.float64)
        if not self._elements:
            self._chunk = max(1, min(FLUSH_ROWS, RAW_CHUNK_BYTES // sample_bytes))
            self._raw = np.empty((self._chunk, *shape), dtype=np.float32)
            self._raw_n = 0
        self._scores = np.empty((self._rows, len(spec.labels)), dtype=np.float64)
        self._lat = np.empty(self._rows, dtype=np.float64)
        self._buffered = 0
        self._flushed = 0

    @property
    def count(self) -> int:
        """Predictions recorded so far (buffered ones included)."""
        return self._flushed + self._buffered

    def record(self, x: np.ndarray, scores: np.ndarray, latency_ms: float) -> None:
        """Add a batch: model inputs (n, *shape) float, scores (n, K), and the batch's latency in ms.

        The batch latency is split evenly over its samples so latency counts match predictions.
        """
        n = int(scores.shape[0])
        if n > self._rows - self._buffered:
            self.flush()
            if n > self._rows:  # a large batch goes straight into the profile
                self.profile.inputs.update(self.spec.features.extract(x))
                self.profile.update_outputs(scores)
                self.profile.update_latency(np.full(n, latency_ms / n))
                self._flushed += n
                return
        i = self._buffered
        if self._elements:
            self._feats[i : i + n] = x.reshape(n, -1)
        elif n > self._chunk - self._raw_n:
            self._summarise()
            if n > self._chunk:
                self._feats[i : i + n] = self.spec.features.extract(x)
            else:
                self._raw[:n] = x
                self._raw_n = n
        else:
            self._raw[self._raw_n : self._raw_n + n] = x
            self._raw_n += n
        self._scores[i : i + n] = scores
        self._lat[i : i + n] = latency_ms / n
        self._buffered = i + n
        if self._buffered == self._rows:
            self.flush()

    def _summarise(self) -> None:
        """Turn the buffered raw images into features (the last ``_raw_n`` buffered samples)."""
        k = self._raw_n
        if k:
            end = self._buffered
            self._feats[end - k : end] = self.spec.features.extract(self._raw[:k])
            self._raw_n = 0

    def add_violation(self, kind: str, n: int = 1) -> None:
        """Count a refused input of ``kind`` (shape, dtype, nan, json, ...)."""
        self.profile.add_violation(kind, n)

    def flush(self) -> None:
        """Fold buffered samples into the profile."""
        if not self._elements:
            self._summarise()
        n = self._buffered
        if not n:
            return
        self.profile.inputs.update(self._feats[:n])
        self.profile.update_outputs(self._scores[:n])
        self.profile.update_latency(self._lat[:n])
        self._flushed += n
        self._buffered = 0

    def close(self, end_ts: float) -> ClosedWindow:
        """Flush and return the finished window."""
        self.flush()
        return ClosedWindow(self.profile, self.start_ts, max(end_ts, self.start_ts), self.model)
