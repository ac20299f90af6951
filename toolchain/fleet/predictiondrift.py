"""Prediction drift: the per-sample scalar outputs of a regression or anomaly model against the baseline.

For a bundle whose task is not classification the profiles carry ``Profile.values`` (the prediction
in the user's units, or the anomaly score) instead of class counts and top-1 confidence. Per value:

- **PSI** on its histogram (edges frozen from the baseline's predictions, the same smoothed PSI as
  the input features), banded with ``class_psi_warn`` / ``class_psi_alert``: it takes the place of
  the predicted-class PSI in the device verdict (``output_state``).
- **Mean shift** ``(mean_c - mean_b) / std_b`` in baseline standard deviations, banded on its
  absolute value with ``prediction_shift_warn`` / ``prediction_shift_alert``: it takes the place of
  the confidence drop (``decay_state``). The mean of 200 predictions has a standard error of
  0.07 baseline standard deviations, so the default bands (0.5, 1.0) are far above sampling noise.

Pure numpy; no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.formats.stats import FeatureSetProfile


@dataclass
class PredictionDrift:
    """One current profile's prediction drift: per value PSI and mean shift, and the two states."""

    names: list[str]
    psi: list[float]
    mean_shift: list[float | None]
    mean: list[float | None]
    mean_baseline: list[float | None]
    output_state: str
    decay_state: str
    reasons: list[str]

    @property
    def max_psi(self) -> float:
        """The highest PSI over the values."""
        return max(self.psi) if self.psi else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``prediction`` in a drift result): floats rounded to 6 digits."""

        def r(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, 6)

        return {
            "names": list(self.names),
            "psi": [r(v) for v in self.psi],
            "mean_shift": [r(v) for v in self.mean_shift],
            "mean": [r(v) for v in self.mean],
            "mean_baseline": [r(v) for v in self.mean_baseline],
            "max_psi": r(self.max_psi),
        }


def _band(value: float, warn: float, alert: float) -> str:
    if not math.isfinite(value):
        return "ok"
    return "alert" if value >= alert else "warn" if value >= warn else "ok"


def compare_values(
    baseline: FeatureSetProfile,
    currents: list[FeatureSetProfile],
    v_psi: np.ndarray,
    psi_bands: tuple[float, float],
    shift_bands: tuple[float, float],
) -> list[PredictionDrift]:
    """Compare each current values profile with the baseline's (same names and edges), given their
    PSI per current and value ``v_psi`` (n, V) (``toolchain.fleet.drift`` computes it with its own
    ``psi``); the bands are (warn, alert) for the PSI and for the absolute mean shift."""
    n_val = baseline.n_features
    std = baseline.std()
    b_mean = [float(m) if n > 0 else None for m, n in zip(baseline.mean, baseline.count, strict=True)]
    out = []
    for i, c in enumerate(currents):
        shifts: list[float | None] = []
        means: list[float | None] = []
        for j in range(n_val):
            has = c.count[j] > 0
            means.append(float(c.mean[j]) if has else None)
            ok = has and std[j] > 0 and baseline.count[j] > 0
            shifts.append(float((c.mean[j] - baseline.mean[j]) / std[j]) if ok else None)
        psis = [float(v) for v in v_psi[i]]
        has_rows = bool(c.count.sum() > 0)
        top = max(psis) if has_rows else 0.0
        worst_shift = max((abs(s) for s in shifts if s is not None), default=0.0)
        out_state = _band(top, *psi_bands) if has_rows else "ok"
        decay = _band(worst_shift, *shift_bands)
        reasons = []
        if out_state != "ok":
            j = int(np.argmax(psis))
            reasons.append(f"prediction PSI {top:.3f} ({baseline.names[j]})")
        if decay != "ok":
            j = max(range(n_val), key=lambda k: abs(shifts[k] or 0.0))
            reasons.append(f"prediction mean shift {shifts[j]:+.2f} sd ({baseline.names[j]})")
        out.append(PredictionDrift(baseline.names, psis, shifts, means, b_mean, out_state, decay, reasons))
    return out
