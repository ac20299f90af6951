"""Merge laws, exact histograms and the baseline round trip of device_agent.formats.stats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.formats.stats import (
    FeatureSetProfile,
    FeatureSpec,
    StatsError,
    baseline_from_dict,
    baseline_to_dict,
    build_baseline,
    make_edges,
)

EDGES = [[0.0, 1.0, 2.0, 4.0], [-1.0, 0.0, 1.0]]
values = st.lists(
    st.tuples(
        st.floats(-10, 10) | st.just(float("nan")),
        st.floats(-10, 10) | st.sampled_from([float("inf"), float("-inf")]),
    ),
    max_size=40,
)


def profile_of(rows: list[tuple[float, float]]) -> FeatureSetProfile:
    p = FeatureSetProfile.empty(["a", "b"], EDGES)
    if rows:
        p.update(np.array(rows, dtype=np.float64))
    return p


def test_bins_underflow_overflow_and_closed_last_edge() -> None:
    p = FeatureSetProfile.empty(["a"], [[0.0, 1.0, 2.0]])
    p.update(np.array([[-0.5], [0.0], [0.99], [1.0], [2.0], [2.01], [np.nan], [np.inf]]))
    assert p.hist(0).tolist() == [1, 2, 2, 1]  # under, [0,1), [1,2], over
    assert p.count[0] == 6 and p.nan_count[0] == 2
    assert p.min[0] == -0.5 and p.max[0] == 2.01


@settings(max_examples=60, deadline=None)
@given(values, values, values)
def test_merge_is_associative_and_matches_one_pass(a: list, b: list, c: list) -> None:
    pa, pb, pc = profile_of(a), profile_of(b), profile_of(c)
    left = pa.merge(pb).merge(pc)
    right = pa.merge(pb.merge(pc))
    whole = profile_of(a + b + c)
    for m in (left, right):
        assert np.array_equal(m.counts, whole.counts)
        assert np.array_equal(m.count, whole.count)
        assert np.array_equal(m.nan_count, whole.nan_count)
        assert np.allclose(m.mean, whole.mean, atol=1e-9)
        assert np.allclose(m.m2, whole.m2, rtol=1e-9, atol=1e-7)
        assert np.array_equal(m.min, whole.min) and np.array_equal(m.max, whole.max)


def test_variance_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, size=(1000, 2))
    p = FeatureSetProfile.empty(["a", "b"], make_edges(x))
    for chunk in np.array_split(x, 7):
        p.update(chunk)
    assert np.allclose(p.mean, x.mean(0)) and np.allclose(p.variance(), x.var(0))


def test_merge_refuses_other_edges() -> None:
    a = FeatureSetProfile.empty(["a"], [[0.0, 1.0]])
    b = FeatureSetProfile.empty(["a"], [[0.0, 2.0]])
    with pytest.raises(StatsError, match="different bin edges"):
        a.merge(b)


def test_constant_feature_gets_usable_edges() -> None:
    e = make_edges(np.zeros((10, 1)))
    assert len(e[0]) == 2 and e[0][0] == 0.0 and e[0][1] > 0.0


def test_feature_kind_depends_on_size() -> None:
    assert FeatureSpec.for_input((8, 8, 1)).kind == "elements"
    spec = FeatureSpec.for_input((32, 32, 3))
    assert spec.kind == "image_summary" and spec.names[:2] == ("c0_mean", "c0_std")
    x = np.random.default_rng(0).random((5, 32, 32, 3)) * 255
    f = spec.extract(x)
    assert f.shape == (5, 12)
    per_c = x.reshape(5, -1, 3)
    want = np.stack([per_c.mean(1), per_c.std(1), per_c.min(1), per_c.max(1)], axis=2).reshape(5, -1)
    assert np.allclose(f, want, rtol=1e-5, atol=1e-3)  # float32 pixels, float64 summaries


def test_baseline_round_trip_and_tamper_detection(digits: dict) -> None:
    x = digits["x"][:300]
    probs = np.eye(10)[digits["y"][:300]] * 0.9 + 0.01
    base = build_baseline(x, probs, [str(i) for i in range(10)])
    doc = json.loads(json.dumps(baseline_to_dict(base, {"data": "digits"})))
    again = baseline_from_dict(doc)
    assert np.array_equal(again.inputs.counts, base.inputs.counts)
    assert again.class_counts.tolist() == base.class_counts.tolist()
    doc["spec"]["input_edges"][0][0] -= 1
    with pytest.raises(StatsError, match="spec_hash"):
        baseline_from_dict(doc)


def test_load_state_refuses_wrong_histogram_length() -> None:
    p = FeatureSetProfile.empty(["a"], [[0.0, 1.0, 2.0]])
    p.update(np.array([[0.5]]))
    state = p.state_dict()
    state["hist"] = [[0, 1, 0]]
    q = FeatureSetProfile.empty(["a"], [[0.0, 1.0, 2.0]])
    with pytest.raises(StatsError, match="bins"):
        q.load_state(state)


@pytest.mark.parametrize("shape", [(40, 40, 1), (24, 24, 3)])
def test_image_summary_of_a_sample_is_the_same_alone_or_in_a_batch(shape, kernel_impl) -> None:
    """Every image (and channel) is reduced on its own row: batching never changes a feature,
    with the C kernel and with the numpy fallback."""
    from device_agent import kernels
    from device_agent.formats.stats import FeatureSpec, summary_features

    rng = np.random.default_rng(1)
    x = (rng.random((9, *shape)) * 255).astype(np.float32)
    spec = FeatureSpec.for_input(shape)
    assert spec.kind == "image_summary"
    batch = spec.extract(x)
    for i in range(len(x)):
        assert np.array_equal(spec.extract(x[i : i + 1])[0], batch[i])
        if shape[-1] == 1:  # the sums Predictor.load_one computes, as the window folds them
            one = summary_features([kernels.summary(x[i].reshape(-1))], x[i].size)[0]
            assert np.array_equal(one, batch[i])
    c = shape[-1]
    per = x.reshape(9, -1, c).astype(np.float64)
    want = np.stack([per.mean(1), per.std(1), per.min(1), per.max(1)], axis=2).reshape(9, -1)
    assert np.allclose(batch, want, rtol=1e-5, atol=1e-4)
