"""The per-sample scalar outputs of regression/anomaly models in profiles, baselines, windows and storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.formats import stats
from device_agent.formats.telemetry import ModelRef, TelemetryError, decode_stats, encode_stats
from device_agent.windows import Window
from toolchain.fleet.drift import compare
from toolchain.fleet.storage import Layout, merge_packed, pack_profile

REF = ModelRef("m", 1, "a" * 64)


def _baseline() -> tuple[np.ndarray, np.ndarray, stats.Profile]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4)).astype(np.float32) * [0.001, 1, 40, 4000]
    y = np.stack([x @ [1000, 2, 0.05, 0.001] + 2000, x[:, 1] * 0.01], axis=1)
    base = stats.build_baseline(x, None, ["rul", "temp"], values=y, value_names=["rul", "temp"])
    return x, y, base


def test_values_round_trip_through_baseline_window_and_wire() -> None:
    x, y, base = _baseline()
    doc = json.loads(json.dumps(stats.baseline_to_dict(base)))
    loaded = stats.baseline_from_dict(doc)
    assert loaded.count == 600 and loaded.values is not None
    np.testing.assert_allclose(loaded.values.mean, y.mean(axis=0), rtol=1e-9)
    assert int(loaded.class_counts.sum()) == 0  # no class counts for a number per sample

    w = Window(loaded.spec, REF, 0.0, 0.0)
    for i in range(30):
        w.record_one(x[i : i + 1], y[i : i + 1].astype(np.float32), 1.0)
    w.record(x[30:80], y[30:80], 5.0)
    closed = w.close(1.0)
    assert closed.count == 80
    assert closed.profile.values is not None
    np.testing.assert_allclose(closed.profile.values.mean, y[:80].mean(axis=0), rtol=1e-5)

    raw = encode_stats(
        device_id="d1", fleet="f", seq=1, window_start=0, window_end=1, model=REF,
        profile=closed.profile, stream="0" * 16,
    )  # fmt: skip
    assert set(json.loads(raw)["outputs"]) == {"class_counts", "confidence", "values"}
    back = decode_stats(raw).profile(loaded.spec)
    assert back.count == 80 and back.values is not None
    np.testing.assert_array_equal(back.values.counts, closed.profile.values.counts)

    layout = Layout.of(loaded.spec)
    merged = merge_packed(layout, [pack_profile(back), pack_profile(loaded)])
    assert merged.count == 680 and merged.values is not None
    np.testing.assert_allclose(merged.values.mean, np.concatenate([y[:80], y]).mean(axis=0), rtol=1e-9)


def test_classifier_profiles_keep_their_old_form() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    base = stats.build_baseline(x, np.eye(3)[rng.integers(0, 3, 200)], ["a", "b", "c"])
    doc = stats.baseline_to_dict(base)
    assert "values" not in doc["spec"] and "values" not in doc["profile"]
    assert base.values is None and not base.spec.has_values
    with pytest.raises(stats.StatsError, match="no values"):
        base.update_values(np.zeros(3))


def test_values_missing_from_a_window_is_refused() -> None:
    x, y, base = _baseline()
    w = base.spec.new_profile()
    w.update_inputs(x[:10])
    w.update_values(y[:10])
    w.update_latency(np.ones(10))
    doc = json.loads(
        encode_stats(
            device_id="d1",
            fleet="f",
            seq=1,
            window_start=0,
            window_end=1,
            model=REF,
            profile=w,
            stream="0" * 16,
        )  # fmt: skip
    )
    del doc["outputs"]["values"]
    with pytest.raises(TelemetryError, match="values"):
        decode_stats(json.dumps(doc).encode()).profile(base.spec)


def test_prediction_drift_alerts_on_a_shift_and_stays_quiet_on_clean_data() -> None:
    x, y, base = _baseline()
    rng = np.random.default_rng(5)
    clean = base.spec.new_profile()
    idx = rng.integers(0, 600, 400)
    clean.update_inputs(x[idx])
    clean.update_values(y[idx])
    r = compare(base, clean)
    assert r.state == "ok", r.reasons
    assert r.prediction is not None and r.prediction.max_psi < 0.1
    assert r.class_psi is None

    shifted = base.spec.new_profile()
    shifted.update_inputs(x[idx])
    shifted.update_values(y[idx] + y.std(axis=0))  # the inputs look the same, the predictions moved
    r = compare(base, shifted)
    assert r.output_state == "alert" and r.decay_state == "alert", r.reasons
    assert r.state == "alert"
    d = r.to_dict(features=False)
    assert d["prediction"]["names"] == ["rul", "temp"]
    assert d["prediction"]["mean_shift"][0] == pytest.approx(1.0, abs=0.15)


def test_the_collectors_fast_path_takes_values_windows() -> None:
    from toolchain.fleet.fastpath import Refused, decode_window

    x, y, base = _baseline()
    w = base.spec.new_profile()
    w.update_inputs(x[:40])
    w.update_values(y[:40])
    w.update_latency(np.ones(40))
    raw = encode_stats(
        device_id="d1", fleet="f", seq=1, window_start=0, window_end=1, model=REF,
        profile=w, stream="0" * 16,
    )  # fmt: skip
    layout = Layout.of(base.spec)
    fw = decode_window(raw, "f", "d1", lambda sha: (layout, base.spec.spec_hash()))
    assert fw.count == 40
    ints, floats = pack_profile(w)
    assert fw.ints == ints  # counts and histograms exactly, the values' included
    assert fw.floats is not None
    np.testing.assert_allclose(  # moments at the wire's 10 significant digits
        np.frombuffer(fw.floats, "<f8"), np.frombuffer(floats, "<f8"), rtol=1e-9
    )
    doc = json.loads(raw)
    doc["count"] = 41  # the values say 40 predictions
    with pytest.raises(Refused):
        decode_window(json.dumps(doc).encode(), "f", "d1", lambda sha: (layout, base.spec.spec_hash()))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-5000, 5000, allow_nan=False), min_size=0, max_size=30),
        min_size=3,
        max_size=3,
    )
)
def test_values_merge_is_associative_and_exact_for_counts(chunks: list[list[float]]) -> None:
    _, y, base = _baseline()
    parts = []
    for c in chunks:
        p = base.spec.new_profile()
        p.update_values(np.array(c + c, dtype=np.float64).reshape(-1, 2))
        parts.append(p)
    a, b, c = parts
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    whole = base.spec.new_profile()
    whole.update_values(np.concatenate([np.array(ch + ch).reshape(-1, 2) for ch in chunks]))
    for m in (left, right):
        assert m.values is not None and whole.values is not None
        np.testing.assert_array_equal(m.values.counts, whole.values.counts)
        assert m.count == whole.count == sum(len(ch) for ch in chunks)
        np.testing.assert_allclose(m.values.mean, whole.values.mean, rtol=1e-9, atol=1e-6)
