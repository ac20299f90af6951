"""Drift metrics against hand-computed values, the device verdict, hysteresis, and packed merges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_agent.formats.stats import FeatureSetProfile, FeatureSpec, ProfileSpec
from toolchain.fleet.drift import (
    AlertState,
    DriftConfig,
    DriftError,
    compare,
    js_distance,
    ks_binned,
    mean_shift_std,
    out_of_range_rate,
    psi,
    step,
)
from toolchain.fleet.storage import Layout, merge_packed, pack_profile

# --------------------------------------------------------------------------------------------------
# Each metric on small histograms, worked out by hand.


def test_psi_hand_computed_with_half_count_smoothing() -> None:
    base = np.array([10, 30, 60])
    cur = np.array([20, 20, 60])
    # Shares with 0.5 added per bin: totals 101.5 for both.
    b = [10.5 / 101.5, 30.5 / 101.5, 60.5 / 101.5]
    c = [20.5 / 101.5, 20.5 / 101.5, 60.5 / 101.5]
    want = (c[0] - b[0]) * math.log(c[0] / b[0]) + (c[1] - b[1]) * math.log(c[1] / b[1]) + 0.0
    assert want == pytest.approx(
        0.0985222 * math.log(20.5 / 10.5) - 0.0985222 * math.log(20.5 / 30.5), rel=1e-5
    )
    assert psi(base, cur)[0] == pytest.approx(want, rel=1e-12)
    assert psi(base, base)[0] == 0.0
    # An empty current bin stays finite thanks to the smoothing.
    assert math.isfinite(psi(np.array([50, 50]), np.array([100, 0]))[0])


def test_js_distance_base2_hand_computed() -> None:
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
    # KL(p||m) = 1/2 log2(2/3) + 1/2 log2(2) ; KL(q||m) = log2(4/3)
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    want = math.sqrt(0.5 * kl_p + 0.5 * kl_q)
    assert want == pytest.approx(0.557923, abs=1e-6)
    assert js_distance(np.array([5, 5]), np.array([7, 0]))[0] == pytest.approx(want, rel=1e-12)
    assert js_distance(np.array([1, 0]), np.array([0, 1]))[0] == pytest.approx(1.0)  # disjoint: maximal
    assert js_distance(np.array([3, 4]), np.array([30, 40]))[0] == pytest.approx(0.0, abs=1e-12)


def test_js_distance_matches_scipy() -> None:
    spatial = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.integers(0, 50, 12), rng.integers(0, 50, 12)
        assert js_distance(a, b)[0] == pytest.approx(spatial.jensenshannon(a, b, base=2), abs=1e-9)


def test_ks_from_binned_cdfs() -> None:
    # CDFs: base 0.1, 0.4, 1.0 ; current 0.2, 0.4, 1.0 -> largest gap 0.1
    assert ks_binned(np.array([1, 3, 6]), np.array([2, 2, 6]))[0] == pytest.approx(0.1)
    assert ks_binned(np.array([10, 0]), np.array([0, 10]))[0] == pytest.approx(1.0)


def test_mean_shift_in_baseline_std() -> None:
    edges = [[0.0, 1.0, 2.0, 4.0]]
    base = FeatureSetProfile.empty(["a"], edges)
    base.update(np.array([[0.0], [2.0]]))  # mean 1, population std 1
    cur = FeatureSetProfile.empty(["a"], edges)
    cur.update(np.array([[3.0], [3.0]]))
    assert mean_shift_std(base, cur)[0] == pytest.approx(2.0)
    flat = FeatureSetProfile.empty(["a"], edges)
    flat.update(np.array([[1.0], [1.0]]))
    assert math.isnan(mean_shift_std(flat, cur)[0])  # undefined for a constant baseline feature


def test_out_of_range_rate_counts_under_overflow_and_nan() -> None:
    p = FeatureSetProfile.empty(["a", "b"], [[0.0, 1.0], [0.0, 1.0]])
    p.update(np.array([[-1.0, 0.5], [0.5, 2.0], [0.5, np.nan], [0.5, 0.5]]))
    # values: a: -1 (under), 0.5 x3 ; b: 0.5, 2 (over), nan, 0.5 -> 3 outside of 8
    assert out_of_range_rate(p) == pytest.approx(3 / 8)


def _tiny_spec() -> ProfileSpec:
    return ProfileSpec(
        FeatureSpec("elements", (2,), ("a", "b")), [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]], ["x", "y"]
    )


def test_compare_outputs_decay_and_skew_hand_computed() -> None:
    spec = _tiny_spec()
    base = spec.new_profile()
    base.update_inputs(np.array([[0.5, 0.5], [1.5, 1.5]] * 50))
    base.update_outputs(np.array([[0.9, 0.1], [0.1, 0.9]] * 50))  # classes 50/50, confidence 0.9
    cur = spec.new_profile()
    cur.update_inputs(np.array([[0.5, 0.5], [1.5, 1.5]] * 50))
    cur.update_outputs(np.array([[0.6, 0.4]] * 100))  # all class x, confidence 0.6
    cur.add_violation("shape", 5)
    cfg = DriftConfig(min_count=50)
    r = compare(base, cur, cfg)
    b = [50.5 / 101, 50.5 / 101]
    c = [100.5 / 101, 0.5 / 101]
    want_class_psi = sum((ci - bi) * math.log(ci / bi) for bi, ci in zip(b, c, strict=True))
    assert r.class_psi == pytest.approx(want_class_psi)
    assert r.confidence_shift == pytest.approx(0.6 - 0.9)
    assert r.decay_state == "alert" and r.output_state == "alert"
    assert r.schema_violation_rate == pytest.approx(5 / 105)
    assert r.skew_state == "warn"  # 4.8 %: above 1 %, below 5 %
    assert r.input_state == "ok" and all(f.psi == pytest.approx(0.0) for f in r.features)
    assert r.state == "alert"


def test_nothing_is_judged_below_min_count() -> None:
    spec = _tiny_spec()
    base = spec.new_profile()
    base.update_inputs(np.array([[0.5, 0.5]] * 100))
    base.update_outputs(np.array([[0.9, 0.1]] * 100))
    cur = spec.new_profile()
    cur.update_inputs(np.array([[1.5, 1.5]] * 10))
    cur.update_outputs(np.array([[0.1, 0.9]] * 10))
    r = compare(base, cur, DriftConfig(min_count=20))
    assert r.state == "insufficient" and "fewer than min_count" in r.reasons[0]
    assert compare(base, cur, DriftConfig(min_count=10)).state == "alert"


def test_digits_verdicts(make_window, digits_model) -> None:
    base, _ = digits_model
    ok = [compare(base, make_window(500, seed=s)).state for s in range(5)]
    assert ok == ["ok"] * 5
    contrast = compare(base, make_window(500, seed=9, transform=lambda x: x * 0.5))
    assert contrast.state == "alert" and contrast.input_state == "alert"
    assert contrast.confidence_shift is not None and contrast.confidence_shift < -0.1
    inverted = compare(base, make_window(500, seed=9, transform=lambda x: 16 - x))
    assert inverted.output_state == "alert" and inverted.skew_state == "alert"


# --------------------------------------------------------------------------------------------------
# Configuration and hysteresis


def test_config_validation_and_overrides() -> None:
    with pytest.raises(DriftError, match="psi_warn=0.3 is above psi_alert=0.2"):
        DriftConfig(psi_warn=0.3)
    with pytest.raises(DriftError, match="unknown drift setting"):
        DriftConfig.from_dict({"psi_alrt": 0.3})
    with pytest.raises(DriftError, match="name=value"):
        DriftConfig().with_overrides(["psi_alert"])
    cfg = DriftConfig().with_overrides(["psi_alert=0.25", "raise_after=3"])
    assert cfg.psi_alert == 0.25 and cfg.raise_after == 3 and isinstance(cfg.raise_after, int)


def test_hysteresis_raises_after_k_and_clears_after_m() -> None:
    s = AlertState()
    changes = []
    for verdict in ["alert", "ok", "alert", "alert", "ok", "ok", "alert", "ok", "ok", "ok"]:
        s, changed = step(s, verdict, raise_after=2, clear_after=3)
        changes.append((s.state, changed))
    assert changes == [
        ("ok", False),
        ("ok", False),  # one noisy window does not raise
        ("ok", False),
        ("alert", True),  # two in a row do
        ("alert", False),
        ("alert", False),
        ("alert", False),  # an alert resets the clearing streak
        ("alert", False),
        ("alert", False),
        ("ok", True),  # three ok in a row clear it
    ]
    same, changed = step(s, "insufficient", 2, 3)
    assert same == s and not changed


# --------------------------------------------------------------------------------------------------
# Packed storage merge equals Profile.merge


def test_merge_packed_equals_profile_merge(make_window, digits_model) -> None:
    base, _ = digits_model
    windows = [make_window(37 + 11 * i, seed=i) for i in range(6)]
    windows[2].add_violation("nan", 3)
    expect = windows[0]
    for w in windows[1:]:
        expect = expect.merge(w)
    got = merge_packed(
        Layout.of(base.spec), [pack_profile(w) for w in windows], [w.schema_violations for w in windows]
    )
    for name in ("inputs", "confidence", "latency_ms"):
        a, b = getattr(got, name), getattr(expect, name)
        assert np.array_equal(a.counts, b.counts) and np.array_equal(a.count, b.count)
        assert np.array_equal(a.min, b.min) and np.array_equal(a.max, b.max)
        assert np.allclose(a.mean, b.mean, atol=1e-9) and np.allclose(a.m2, b.m2, rtol=1e-9, atol=1e-6)
    assert np.array_equal(got.class_counts, expect.class_counts)
    assert got.schema_violations == {"nan": 3}
