"""Drift, skew and decay metrics computed from merged profiles (pure numpy; no I/O, no clock).

Every metric compares a *current* profile (one window, or many merged) against the model's baseline
profile; both share bin edges (the baseline's), so nothing needs raw data.

Per input feature (histograms include the underflow and overflow bins):

- **PSI** (population stability index) ``sum_i (c_i - b_i) * ln(c_i / b_i)`` over bin shares ``b``
  (baseline) and ``c`` (current). Empty bins would make it infinite, so shares are smoothed with
  ``SMOOTHING`` = 0.5 pseudo-counts per bin (the Jeffreys / Krichevsky-Trofimov estimator):
  ``share_i = (n_i + 0.5) / (n + 0.5 * bins)``. Bands 0.1 (warn) and 0.2 (alert): Siddiqi,
  "Credit Risk Scorecards" (Wiley 2006), which gives < 0.1 stable, 0.1-0.25 some change and
  > 0.25 a shift; we alert at 0.2, the tighter end used by most monitoring tools.
- **Jensen-Shannon distance**, base 2 (in [0, 1]): ``sqrt(JSD)`` with
  ``JSD = 1/2 KL(b || m) + 1/2 KL(c || m)``, ``m = (b + c) / 2`` on unsmoothed shares
  (``0 log 0 = 0``). A *distance*, not the divergence TFDV reports; 0.1 is Evidently's default
  drift threshold for it (Evidently docs, "data drift" presets).
- **KS statistic** ``max_k |B_k - C_k|`` over the cumulative shares at every bin edge. From binned
  data it is a lower bound of the sample KS statistic (exact when no bin is split by the other
  sample), so it is reported but does not vote.
- **Mean shift** ``(mean_c - mean_b) / std_b`` in baseline standard deviations (``None`` when the
  baseline feature is constant).

Outputs: the predicted-class distribution is compared with PSI (same smoothing), and the mean top-1
confidence minus the baseline's is a label-free sign of decay (a drop means the model is less sure).

Skew: the schema-violation rate (inputs the agent refused, over refused + predicted) and the
out-of-range rate (share of feature values in the underflow/overflow bins or non-finite).

A feature is in alert when PSI >= psi_alert or JS >= js_alert, in warn when PSI >= psi_warn or
JS >= js_warn. The JS distance of a finite window has a floor from sampling noise alone (about 0.08
for 500 samples in 15 bins), so at the usual window sizes JS 0.1 is a warn band and alerts need 0.2.

Device verdict (the aggregation rule; see docs/fleet.md): with F input features, the inputs are in
alert when at least ``feature_share_alert`` (10 %) of them are in alert, in warn when at least
``feature_share_warn`` (50 %) are in warn or above. A few of 64 features crossing a band is expected
by chance in a 500-sample window, so a single feature never decides a device
(``benchmarks/drift_bench.py`` measures the rule). The device state is the worst of inputs, outputs
(class PSI), decay (confidence drop) and skew; nothing is judged below ``min_count`` predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from device_agent.formats.stats import FeatureSetProfile, Profile
from toolchain.errors import ToolchainError
from toolchain.fleet.predictiondrift import PredictionDrift, compare_values

SMOOTHING = 0.5
STATES = ("insufficient", "ok", "warn", "alert")
SEVERITY = {"insufficient": -1, "ok": 0, "warn": 1, "alert": 2}


class DriftError(ToolchainError):
    """A drift configuration or comparison is invalid."""


@dataclass(frozen=True)
class DriftConfig:
    """Thresholds for one model; every field can be overridden per model at registration."""

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    js_warn: float = 0.1
    js_alert: float = 0.2
    min_count: int = 200
    feature_share_warn: float = 0.5
    feature_share_alert: float = 0.1
    class_psi_warn: float = 0.1
    class_psi_alert: float = 0.2
    confidence_drop_warn: float = 0.05
    confidence_drop_alert: float = 0.1
    out_of_range_warn: float = 0.01
    out_of_range_alert: float = 0.05
    violation_warn: float = 0.01
    violation_alert: float = 0.05
    # Regression/anomaly bundles: |mean shift| of the predictions in baseline standard deviations
    # (toolchain.fleet.predictiondrift; their prediction PSI uses the class_psi bands).
    prediction_shift_warn: float = 0.5
    prediction_shift_alert: float = 1.0
    raise_after: int = 2
    clear_after: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise DriftError(f"drift setting {f.name}={v!r} must be a finite number >= 0")
        pairs = [
            ("psi_warn", "psi_alert"),
            ("js_warn", "js_alert"),
            ("class_psi_warn", "class_psi_alert"),
            ("confidence_drop_warn", "confidence_drop_alert"),
            ("out_of_range_warn", "out_of_range_alert"),
            ("violation_warn", "violation_alert"),
            ("prediction_shift_warn", "prediction_shift_alert"),
        ]
        for w, a in pairs:
            if getattr(self, w) > getattr(self, a):
                raise DriftError(
                    f"drift setting {w}={getattr(self, w)} is above {a}={getattr(self, a)}; lower it"
                )
        for k in ("raise_after", "clear_after", "min_count"):
            if int(getattr(self, k)) < 1 or int(getattr(self, k)) != getattr(self, k):
                raise DriftError(f"drift setting {k}={getattr(self, k)!r} must be an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DriftConfig:
        """Build a config from overrides, refusing unknown names."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DriftError(f"unknown drift setting(s) {unknown}. Known: {', '.join(sorted(known))}")
        out = cls()
        return replace(
            out,
            **{k: (int(v) if k in ("raise_after", "clear_after", "min_count") else v) for k, v in d.items()},
        )

    def with_overrides(self, pairs: list[str]) -> DriftConfig:
        """Apply ``name=value`` strings (from ``--set``)."""
        upd: dict[str, Any] = self.to_dict()
        for p in pairs:
            name, sep, value = p.partition("=")
            if not sep:
                raise DriftError(f"setting {p!r} must look like name=value, e.g. psi_alert=0.25")
            try:
                upd[name.strip()] = float(value)
            except ValueError:
                raise DriftError(f"setting {p!r}: {value!r} is not a number") from None
        return DriftConfig.from_dict(upd)


# --------------------------------------------------------------------------------------------------
# Metrics on histograms. Arrays are (F, W) counts with a validity mask (features have different
# numbers of bins); every function returns one value per row.


def _shares(counts: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    c = np.where(mask, counts.astype(np.float64) + alpha, 0.0)
    total = c.sum(axis=1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def psi(
    base: np.ndarray, cur: np.ndarray, mask: np.ndarray | None = None, alpha: float = SMOOTHING
) -> np.ndarray:
    """Population stability index per row of bin counts (smoothed with ``alpha`` per bin)."""
    base, cur = np.atleast_2d(base), np.atleast_2d(cur)
    mask = np.ones(base.shape, dtype=bool) if mask is None else np.atleast_2d(mask)
    b, c = _shares(base, mask, alpha), _shares(cur, mask, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(mask & (b > 0) & (c > 0), (c - b) * np.log(c / np.where(b > 0, b, 1.0)), 0.0)
    return terms.sum(axis=1)


def js_distance(base: np.ndarray, cur: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Jensen-Shannon distance (base 2, in [0, 1]) per row of bin counts (no smoothing)."""
    base, cur = np.atleast_2d(base), np.atleast_2d(cur)
    mask = np.ones(base.shape, dtype=bool) if mask is None else np.atleast_2d(mask)
    b, c = _shares(base, mask, 0.0), _shares(cur, mask, 0.0)
    m = (b + c) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kb = np.where(b > 0, b * np.log2(b / np.where(m > 0, m, 1.0)), 0.0).sum(axis=1)
        kc = np.where(c > 0, c * np.log2(c / np.where(m > 0, m, 1.0)), 0.0).sum(axis=1)
    jsd = np.clip(0.5 * kb + 0.5 * kc, 0.0, 1.0)
    return np.sqrt(jsd)


def ks_binned(base: np.ndarray, cur: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Kolmogorov-Smirnov statistic from binned CDFs: max |B_k - C_k| over bin boundaries."""
    base, cur = np.atleast_2d(base), np.atleast_2d(cur)
    mask = np.ones(base.shape, dtype=bool) if mask is None else np.atleast_2d(mask)
    b, c = _shares(base, mask, 0.0), _shares(cur, mask, 0.0)
    return np.abs(np.cumsum(b, axis=1) - np.cumsum(c, axis=1)).max(axis=1)


def mean_shift_std(base: FeatureSetProfile, cur: FeatureSetProfile) -> np.ndarray:
    """(current mean - baseline mean) / baseline std per feature; NaN where the baseline std is 0."""
    std = base.std()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(std > 0, (cur.mean - base.mean) / np.where(std > 0, std, 1.0), np.nan)
    return np.where(cur.count > 0, out, np.nan)


def _bin_mask(fp: FeatureSetProfile) -> np.ndarray:
    width = fp.counts.shape[1]
    return np.arange(width)[None, :] < (fp.nedges[:, None] + 1)


def out_of_range_rate(cur: FeatureSetProfile) -> float:
    """Share of all feature values that fell in the under/overflow bins or were non-finite."""
    idx = np.arange(cur.n_features)
    outside = cur.counts[:, 0].sum() + cur.counts[idx, cur.nedges].sum() + cur.nan_count.sum()
    total = cur.count.sum() + cur.nan_count.sum()
    return float(outside / total) if total else 0.0


# --------------------------------------------------------------------------------------------------
# Comparison


@dataclass
class FeatureDrift:
    """Drift metrics of one input feature."""

    name: str
    count: int
    psi: float
    js: float
    ks: float
    mean_shift: float | None
    state: str


class DriftResult:
    """The comparison of one current profile against its baseline.

    Per-feature metrics are kept as arrays (``features`` builds the list of FeatureDrift on first use),
    so a fleet-wide query over thousands of devices stays cheap.
    """

    SCALARS = (
        "count",
        "state",
        "reasons",
        "input_state",
        "alert_share",
        "warn_share",
        "class_psi",
        "output_state",
        "confidence_mean_baseline",
        "confidence_mean",
        "confidence_shift",
        "decay_state",
        "schema_violation_rate",
        "out_of_range_rate",
        "skew_state",
        "class_share",
    )

    def __init__(
        self,
        *,
        names: list[str],
        f_count: np.ndarray,
        f_psi: np.ndarray,
        f_js: np.ndarray,
        f_ks: np.ndarray,
        f_ms: np.ndarray,
        f_code: np.ndarray,
        **scalars: Any,
    ) -> None:
        self.names = names
        self.f_count, self.f_psi, self.f_js, self.f_ks, self.f_ms, self.f_code = (
            f_count,
            f_psi,
            f_js,
            f_ks,
            f_ms,
            f_code,
        )
        for k in self.SCALARS:
            setattr(self, k, scalars[k])
        # Regression/anomaly bundles: drift of the predicted values (None for classifiers).
        self.prediction: PredictionDrift | None = scalars.get("prediction")
        self._features: list[FeatureDrift] | None = None

    count: int
    state: str
    reasons: list[str]
    input_state: str
    alert_share: float
    warn_share: float
    class_psi: float | None
    output_state: str
    confidence_mean_baseline: float | None
    confidence_mean: float | None
    confidence_shift: float | None
    decay_state: str
    schema_violation_rate: float
    out_of_range_rate: float
    skew_state: str
    class_share: list[float]

    @property
    def features(self) -> list[FeatureDrift]:
        """Every input feature's metrics, in feature order."""
        if self._features is None:
            self._features = [
                FeatureDrift(n, c, p, j, k, None if m != m else m, _CODE_NAMES[s])
                for n, c, p, j, k, m, s in zip(
                    self.names,
                    self.f_count.tolist(),
                    self.f_psi.tolist(),
                    self.f_js.tolist(),
                    self.f_ks.tolist(),
                    self.f_ms.tolist(),
                    self.f_code.tolist(),
                    strict=True,
                )
            ]
        return self._features

    @property
    def max_psi(self) -> float:
        """Return the highest feature PSI (0 without features)."""
        return float(self.f_psi.max()) if self.f_psi.size else 0.0

    def worst_features(self, n: int = 5) -> list[FeatureDrift]:
        """Return the n features with the highest PSI."""
        order = np.argsort(-self.f_psi, kind="stable")[:n]
        feats = self.features
        return [feats[i] for i in order]

    def to_dict(self, features: bool = True) -> dict[str, Any]:
        """Return a JSON-ready dict (floats rounded to 6 digits, non-finite as null)."""
        d = {k: _clean(getattr(self, k)) for k in self.SCALARS}
        d["max_psi"] = _clean(self.max_psi)
        if self.prediction is not None:  # only for scalar-output bundles: classifier results unchanged
            d["prediction"] = self.prediction.to_dict()
        if features:
            cols = [np.round(a, 6).tolist() for a in (self.f_psi, self.f_js, self.f_ks, self.f_ms)]
            d["features"] = [
                {
                    "name": n,
                    "count": c,
                    "psi": p,
                    "js": j,
                    "ks": k,
                    "mean_shift": None if m != m else m,
                    "state": _CODE_NAMES[s],
                }
                for n, c, p, j, k, m, s in zip(
                    self.names, self.f_count.tolist(), *cols, self.f_code.tolist(), strict=True
                )
            ]
        return d


_CODE_NAMES = {-1: "insufficient", 0: "ok", 1: "warn", 2: "alert"}


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return round(o, 6) if math.isfinite(o) else None
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def _band(value: float | None, warn: float, alert: float) -> str:
    if value is None or not math.isfinite(value):
        return "ok"
    if value >= alert:
        return "alert"
    if value >= warn:
        return "warn"
    return "ok"


def worst(*states: str) -> str:
    """Return the most severe of the given states."""
    return max(states, key=lambda s: SEVERITY[s])


def compare(baseline: Profile, current: Profile, config: DriftConfig | None = None) -> DriftResult:
    """Compare a current profile with its baseline: per-feature metrics, outputs, decay, skew, verdict."""
    return compare_many(baseline, [current], config)[0]


def compare_many(
    baseline: Profile, currents: list[Profile], config: DriftConfig | None = None
) -> list[DriftResult]:
    """Compare many current profiles (devices, time buckets) with one baseline, vectorised over them."""
    cfg = config or DriftConfig()
    if not currents:
        return []
    for c in currents:
        if c.spec is not baseline.spec and c.spec.spec_hash() != baseline.spec.spec_hash():
            raise DriftError(
                "current profile and baseline have different specs; was the model re-registered?"
            )
    b_in = baseline.inputs
    n_dev, n_feat = len(currents), b_in.n_features
    width = b_in.counts.shape[1]
    mask = np.broadcast_to(_bin_mask(b_in), (n_dev, n_feat, width)).reshape(-1, width)
    base = np.broadcast_to(b_in.counts, (n_dev, n_feat, width)).reshape(-1, width)
    cur = np.stack([c.inputs.counts for c in currents]).reshape(-1, width)
    f_psi = psi(base, cur, mask).reshape(n_dev, n_feat)
    f_js = js_distance(base, cur, mask).reshape(n_dev, n_feat)
    f_ks = ks_binned(base, cur, mask).reshape(n_dev, n_feat)
    c_count = np.stack([c.inputs.count for c in currents])
    c_mean = np.stack([c.inputs.mean for c in currents])
    std = b_in.std()
    with np.errstate(divide="ignore", invalid="ignore"):
        f_ms = np.where(
            (std > 0)[None, :] & (c_count > 0),
            (c_mean - b_in.mean[None, :]) / np.where(std > 0, std, 1.0),
            np.nan,
        )
    code = np.where(
        (f_psi >= cfg.psi_alert) | (f_js >= cfg.js_alert),
        2,
        np.where((f_psi >= cfg.psi_warn) | (f_js >= cfg.js_warn), 1, 0),
    )
    code = np.where(c_count < cfg.min_count, -1, code)
    n_alert = (code == 2).sum(axis=1)
    n_warn = (code >= 1).sum(axis=1)
    # Outputs and skew, one value per current profile.
    k = baseline.class_counts.size
    cc = np.stack([c.class_counts for c in currents])
    c_psi = psi(np.broadcast_to(baseline.class_counts, (n_dev, k)), cc)
    idx = np.arange(n_feat)
    c3 = cur.reshape(n_dev, n_feat, width)
    nan = np.stack([c.inputs.nan_count for c in currents])
    outside = c3[:, :, 0].sum(axis=1) + c3[:, idx, b_in.nedges].sum(axis=1) + nan.sum(axis=1)
    total = c_count.sum(axis=1) + nan.sum(axis=1)
    oor_all = np.where(total > 0, outside / np.maximum(total, 1), 0.0)
    nf = max(n_feat, 1)
    base_conf = float(baseline.confidence.mean[0]) if baseline.confidence.count[0] > 0 else None
    preds: list[PredictionDrift | None] = [None] * n_dev
    if baseline.values is not None:
        vals = [c.values if c.values is not None else baseline.values.empty_like() for c in currents]
        psi_bands = (cfg.class_psi_warn, cfg.class_psi_alert)
        shift_bands = (cfg.prediction_shift_warn, cfg.prediction_shift_alert)
        bv = baseline.values
        vw = bv.counts.shape[1]
        v_mask = np.broadcast_to(_bin_mask(bv), (n_dev, bv.n_features, vw)).reshape(-1, vw)
        v_base = np.broadcast_to(bv.counts, (n_dev, bv.n_features, vw)).reshape(-1, vw)
        v_psi = psi(v_base, np.stack([v.counts for v in vals]).reshape(-1, vw), v_mask)
        preds = list(compare_values(bv, vals, v_psi.reshape(n_dev, -1), psi_bands, shift_bands))
    results = []
    for i, current in enumerate(currents):
        n = current.count
        enough = n >= cfg.min_count
        alert_share, warn_share = int(n_alert[i]) / nf, int(n_warn[i]) / nf
        reasons: list[str] = []
        if alert_share >= cfg.feature_share_alert:
            input_state = "alert"
        elif warn_share >= cfg.feature_share_warn:
            input_state = "warn"
        else:
            input_state = "ok"
        if input_state != "ok":
            reasons.append(f"{int(n_alert[i])} of {nf} features in alert, {int(n_warn[i])} in warn or above")
        class_psi = conf_mean = conf_shift = None
        class_share: list[float] = []
        output_state = decay_state = "ok"
        pred = preds[i]
        if pred is not None:  # a number per sample: prediction PSI and mean shift instead
            output_state, decay_state = pred.output_state, pred.decay_state
            reasons += pred.reasons
        elif n > 0:
            class_psi = float(c_psi[i])
            class_share = (cc[i] / n).tolist()
            output_state = _band(class_psi, cfg.class_psi_warn, cfg.class_psi_alert)
            if output_state != "ok":
                reasons.append(f"predicted-class PSI {class_psi:.3f}")
            if current.confidence.count[0] > 0 and base_conf is not None:
                conf_mean = float(current.confidence.mean[0])
                conf_shift = conf_mean - base_conf
                decay_state = _band(-conf_shift, cfg.confidence_drop_warn, cfg.confidence_drop_alert)
                if decay_state != "ok":
                    reasons.append(f"top-1 confidence {conf_mean:.3f} vs baseline {base_conf:.3f}")
        violations = sum(current.schema_violations.values())
        viol_rate = violations / (violations + n) if violations + n else 0.0
        oor = float(oor_all[i])
        skew_state = worst(
            _band(viol_rate, cfg.violation_warn, cfg.violation_alert),
            _band(oor, cfg.out_of_range_warn, cfg.out_of_range_alert),
        )
        if skew_state != "ok":
            reasons.append(f"schema violations {viol_rate:.1%}, out of range {oor:.1%}")
        if enough:
            state = worst(input_state, output_state, decay_state, skew_state)
        else:
            state = "insufficient"
            reasons = [f"{n} predictions, fewer than min_count={cfg.min_count}"]
        ins = "insufficient"
        results.append(
            DriftResult(
                names=b_in.names,
                f_count=c_count[i],
                f_psi=f_psi[i],
                f_js=f_js[i],
                f_ks=f_ks[i],
                f_ms=f_ms[i],
                f_code=code[i],
                count=n,
                state=state,
                reasons=reasons,
                input_state=input_state if enough else ins,
                alert_share=alert_share,
                warn_share=warn_share,
                class_psi=class_psi,
                output_state=output_state if enough else ins,
                confidence_mean_baseline=base_conf,
                confidence_mean=conf_mean,
                confidence_shift=conf_shift,
                decay_state=decay_state if enough else ins,
                schema_violation_rate=viol_rate,
                out_of_range_rate=oor,
                skew_state=skew_state if enough else ins,
                class_share=class_share,
                prediction=pred,
            )
        )
    return results


# --------------------------------------------------------------------------------------------------
# Hysteresis


@dataclass(frozen=True)
class AlertState:
    """Hysteresis state of one device: the reported state and the streak towards a new one."""

    state: str = "ok"
    candidate: str = "ok"
    streak: int = 0


def step(prev: AlertState, verdict: str, raise_after: int, clear_after: int) -> tuple[AlertState, bool]:
    """Advance the hysteresis with one evaluation's verdict; return the new state and whether it changed.

    A more severe verdict must be seen ``raise_after`` evaluations in a row before the state rises;
    a less severe one ``clear_after`` times in a row before it falls. ``insufficient`` changes nothing.
    """
    if verdict == "insufficient":
        return prev, False
    if verdict == prev.state:
        return AlertState(prev.state, prev.state, 0), False
    streak = prev.streak + 1 if verdict == prev.candidate else 1
    need = raise_after if SEVERITY[verdict] > SEVERITY[prev.state] else clear_after
    if streak >= need:
        return AlertState(verdict, verdict, 0), True
    return AlertState(prev.state, verdict, streak), False
