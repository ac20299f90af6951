"""The agent's native kernels (device_agent/_kernels.c) against their numpy definitions."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent import kernels

native = pytest.mark.skipif(
    kernels._native is None, reason="device_agent._kernels not built (see test_native_kernels_are_built)"
)


def test_native_kernels_are_built() -> None:
    """The install builds the C extension (a C compiler is part of the test set-up); without it the
    agent still works on the numpy fallbacks, but slower."""
    assert kernels._native is not None, "run 'pip install -e .' with a C compiler and the Python headers"
    # built against numpy's C API (numpy >= 2 is a build requirement): the runner reads samples and
    # makes its scores arrays without Python calls
    assert kernels._native.NUMPY_API == 1, "the build found no numpy headers; see setup.py"


def _reference_codes(x: np.ndarray, scale: np.float32, zp: np.float32, dtype: type) -> np.ndarray:
    from device_agent.formats.manifest import DType, Quantization, TensorSpec
    from device_agent.inference import quantize

    spec = TensorSpec(
        name="x",
        shape=(1, x.size),
        dtype=DType(np.dtype(dtype).name),
        quantization=Quantization(scale=float(scale), zero_point=int(zp)),
    )
    return quantize(x[None], spec)[0]


@native
@pytest.mark.parametrize("dtype,qmin,qmax", [(np.int8, -128, 127), (np.uint8, 0, 255)])
def test_quantize_matches_the_reference_formula(dtype, qmin, qmax) -> None:
    """Same codes as ``inference.quantize`` (divide, round half to even, zero point, clip), for
    values in range, far out of range, exactly on .5 ties and beyond 2**22 / scale."""
    rng = np.random.default_rng(3)
    for trial in range(60):
        scale = np.float32(rng.choice([0.0037, 0.0625, 0.5, 3.0]))
        zp = np.float32(rng.integers(qmin, qmax + 1))
        n = int(rng.integers(1, 5000))
        x = (rng.normal(0, 1, n) * rng.choice([1, 60, 1e4]) * scale).astype(np.float32)
        ties = rng.integers(0, n, max(1, n // 10))
        x[ties] = ((rng.integers(-300, 300, ties.size) + 0.5) * scale).astype(np.float32)
        x[rng.integers(0, n)] = np.float32(3e38)
        out = np.empty(n, dtype=dtype)
        summ = kernels._native.quantize(x, scale, zp, qmin, qmax, out)
        with np.errstate(over="ignore"):  # 3e38 / scale overflows to inf, which clips to qmax
            want = _reference_codes(x, scale, zp, dtype)
            ref = kernels.quantize_numpy(x, scale, zp, qmin, qmax, np.empty(n, dtype=dtype))
        assert np.array_equal(out, want), trial
        assert summ[0] == x.min() and summ[1] == x.max()
        assert summ[:2] == ref[:2]
        assert summ[2] == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-6, abs=1e-3)


@native
def test_summary_matches_numpy_and_flags_non_finite_values() -> None:
    rng = np.random.default_rng(4)
    for n in (1, 7, 63, 64, 65, 9216, 30001):
        x = (rng.random(n) * 255 - 20).astype(np.float32)
        lo, hi, s, ss = kernels._native.summary(x)
        assert (lo, hi) == (float(x.min()), float(x.max()))
        x64 = x.astype(np.float64)
        assert s == pytest.approx(x64.sum(), rel=1e-6)
        assert ss == pytest.approx((x64 * x64).sum(), rel=1e-6)
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[rng.integers(0, n)] = bad
            got = kernels._native.summary(y)
            assert np.isnan(got[0]) and np.isnan(got[1])
            assert not np.isfinite(kernels.summary_numpy(y)[:2]).all()


@native
def test_store_and_decode_rows_match_the_numpy_fallbacks() -> None:
    rng = np.random.default_rng(5)
    table = ((np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32) + 128) / 256).astype(np.float32)
    for _ in range(50):
        raw = rng.integers(-128, 128, (1, 10)).astype(np.int8)
        raw[0, rng.integers(0, 10)] = raw.max()  # ties: the first maximum wins, as in numpy
        got_rows, ref_rows = np.zeros((4, 10)), np.zeros((4, 10))
        got_lat, ref_lat = np.zeros(4), np.zeros(4)
        got_out, ref_out = np.empty((1, 10), np.float32), np.empty((1, 10), np.float32)
        got = kernels._native.decode_row(raw, table, got_out, got_rows, 2, got_lat, 1.5)
        ref = kernels.decode_row_numpy(raw, table, ref_out, ref_rows, 2, ref_lat, 1.5)
        assert got == ref
        assert np.array_equal(got_out, ref_out) and np.array_equal(got_rows, ref_rows)
        assert np.array_equal(got_lat, ref_lat)
    scores = np.array([[0.1, np.nan, 0.9, np.nan]], np.float32)
    rows, lat = np.zeros((1, 4)), np.zeros(1)
    assert kernels._native.store_row(scores, rows, 0, lat, 1.0)[0] == int(scores.argmax()) == 1


@native
def test_kernels_refuse_buffers_that_do_not_fit() -> None:
    k = kernels._native
    x = np.zeros(16, np.float32)
    with pytest.raises(TypeError, match="float32"):
        k.summary(np.zeros(16))  # float64
    with pytest.raises((TypeError, BufferError, ValueError)):
        k.summary(np.zeros((4, 8), np.float32)[:, ::2])  # not contiguous
    with pytest.raises(ValueError, match="one byte per value"):
        k.quantize(x, 0.1, 0.0, -128, 127, np.zeros(15, np.int8))
    with pytest.raises(ValueError, match="do not fit"):
        k.store_row(np.zeros(3, np.float32), np.zeros((2, 4)), 0, np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        k.store_row(np.zeros(4, np.float32), np.zeros((2, 4)), 2, np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros((2, 4))
        ro.flags.writeable = False
        k.store_row(np.zeros(4, np.float32), ro, 0, np.zeros(2), 1.0)


def test_single_sample_window_equals_the_batch_window(kernel_impl) -> None:
    """One image at a time (summaries deferred to the fold, scores stored by store_row) gives the
    profile a batch gives, and ``record_one`` reports numpy's top-1."""
    from device_agent.formats.stats import build_baseline
    from device_agent.formats.telemetry import ModelRef
    from device_agent.windows import Window

    rng = np.random.default_rng(6)
    x = (rng.random((700, 40, 40, 1)) * 255).astype(np.float32)
    probs = rng.dirichlet(np.ones(5), 700).astype(np.float32)
    spec = build_baseline(x[:200], probs[:200], list("abcde")).spec
    one = Window(spec, ModelRef("m", 1, "0" * 64), 0.0, 0.0)
    batch = Window(spec, ModelRef("m", 1, "0" * 64), 0.0, 0.0)
    for i in range(700):
        summ = kernels.summary(x[i].reshape(-1))
        top = one.record_one(x[i : i + 1], probs[i : i + 1], 0.5, summ)
        assert top == (int(probs[i].argmax()), float(probs[i].max()))
    batch.record(x, probs, 0.5 * 700)
    a, b = one.close(1.0).profile, batch.close(1.0).profile
    assert a.count == b.count == 700
    assert np.array_equal(a.inputs.counts, b.inputs.counts)
    assert np.array_equal(a.inputs.min, b.inputs.min) and np.array_equal(a.inputs.max, b.inputs.max)
    assert np.allclose(a.inputs.mean, b.inputs.mean) and np.allclose(a.inputs.m2, b.inputs.m2)
    assert a.class_counts.tolist() == b.class_counts.tolist()
    assert np.array_equal(a.confidence.counts, b.confidence.counts)
    assert np.array_equal(a.latency_ms.counts, b.latency_ms.counts)


def test_agent_single_samples_equal_the_batch_path_on_a_real_int8_bundle(kernel_impl) -> None:
    """LiteRT, int8 in and out: one sample per call (one-pass quantization, table decoding, rows
    stored natively) gives the batch path's scores bit for bit, and the same window."""
    from device_agent.agent import Agent
    from device_agent.inference import InputError
    from tests.device_agent.agent_bundles import cached_tflite_bundle, digits

    x = digits()["x_test"][:120]
    single = Agent(cached_tflite_bundle(), runtime="litert")
    batched = Agent(cached_tflite_bundle(), runtime="litert")
    assert single.model.predictor.out_table is not None  # the int8 output takes the table path
    want = batched.predict(x)
    for i in range(len(x)):
        got = single.predict(x[i])
        assert np.array_equal(got.outputs, want.outputs[i : i + 1])
        assert got.labels == want.labels[i : i + 1] and got.scores == [want.scores[i]]
    bad = x[0].copy()
    bad[3, 3, 0] = np.inf
    with pytest.raises(InputError) as e:
        single.predict(bad)
    assert e.value.kind == "nan"
    a, b = single.close_window().profile, batched.close_window().profile
    assert a.count == b.count == len(x) and a.schema_violations == {"nan": 1}
    assert np.array_equal(a.inputs.counts, b.inputs.counts)
    assert a.class_counts.tolist() == b.class_counts.tolist()
    assert np.array_equal(a.confidence.counts, b.confidence.counts)


@native
@pytest.mark.parametrize("n_features", [9, 8, 3])
def test_profile_update_equals_the_numpy_definition_to_the_bit(monkeypatch, n_features: int) -> None:
    """Histograms, counts, NaN counts, min/max, mean and M2 after several batches (values on the
    edges, on the last edge, out of range, NaN and infinities) are identical with and without C,
    for feature counts that are and are not multiples of the kernel's four lanes."""
    from device_agent.formats.stats import FeatureSetProfile

    rng = np.random.default_rng(7)
    edges = [
        sorted(set(np.round(rng.normal(0, 3, int(rng.integers(2, 12))), 2).tolist()))
        for _ in range(n_features)
    ]
    edges = [e if len(e) >= 2 else [e[0], e[0] + 1.0] for e in edges]
    names = [f"f{j}" for j in range(len(edges))]
    native_p = FeatureSetProfile.empty(names, edges)
    numpy_p = FeatureSetProfile.empty(names, edges)
    for n in (1, 5, 256, 1000, 3):
        x = rng.normal(0, 4, (n, len(edges)))
        for j, e in enumerate(edges):  # exact edge values, the last edge included
            rows = rng.integers(0, n, max(1, n // 5))
            x[rows, j] = rng.choice(e, rows.size)
        if n > 3:
            x[rng.integers(0, n, 3), rng.integers(0, len(edges), 3)] = [np.nan, np.inf, -np.inf]
        native_p.update(x)
        monkeypatch.setattr(kernels, "NATIVE", False)
        numpy_p.update(x)
        monkeypatch.setattr(kernels, "NATIVE", True)
    for field in ("counts", "count", "nan_count", "min", "max", "mean", "m2"):
        assert np.array_equal(getattr(native_p, field), getattr(numpy_p, field)), field
    assert native_p.nan_count.sum() == 3 * 3


@native
def test_profile_update_leaves_read_only_profiles_to_numpy() -> None:
    """A profile over read-only arrays (as unpacked from storage) still updates, by numpy."""
    from device_agent.formats.stats import FeatureSetProfile

    p = FeatureSetProfile.empty(["a"], [[0.0, 1.0, 2.0]])
    p.count.flags.writeable = False
    p.update(np.array([[0.5], [1.5], [2.0]]))
    assert p.hist(0).tolist() == [0, 1, 2, 0] and p.count.tolist() == [3]


def test_litert_batches_run_beside_the_single_sample_interpreter() -> None:
    """Batches go to a second interpreter sized to them; single samples keep the first one's
    size (no tensor re-allocation between them), and every sample gets the same scores."""
    from device_agent.agent import Agent
    from tests.device_agent.agent_bundles import cached_tflite_bundle, digits

    x = digits()["x_test"][:40]
    agent = Agent(cached_tflite_bundle(), runtime="litert")
    model = agent.model.predictor.model
    singles = np.concatenate([agent.predict(x[i]).outputs for i in range(len(x))])
    for lo, hi in ((0, 7), (7, 8), (8, 15), (15, 40), (0, 2)):
        got = agent.predict(x[lo:hi]).outputs
        assert np.array_equal(got, singles[lo:hi]), (lo, hi)
        assert model._batch == 1  # the single-sample interpreter was never resized
    assert model._batch_interp is not None and model._batch_n == 2


@native
def test_fold_outputs_equals_the_numpy_definition(monkeypatch) -> None:
    """Class counts and confidence histograms from the C fold equal numpy's for probabilities
    (values past [0, 1] by quantization included); logits, NaN and rows whose sums sit on the
    tolerance are left to numpy (False, nothing changed)."""
    from device_agent.formats.stats import build_baseline

    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.ones(6) * 0.3, 2000)
    probs[:50] = np.round(probs[:50] * 255) / 255 * 1.004  # int8-like, a little over 1
    probs[50, 2] = -5e-7
    spec = build_baseline(rng.random((100, 4)), probs[:100], list("abcdef")).spec
    native_p, numpy_p = spec.new_profile(), spec.new_profile()
    conf = np.empty(len(probs))
    before = native_p.class_counts.copy()
    assert kernels.fold_outputs(probs, native_p.class_counts, conf)
    assert native_p.class_counts.sum() == before.sum() + len(probs)
    native_p.class_counts[:] = before
    native_p.update_outputs(probs)
    monkeypatch.setattr(kernels, "fold_outputs", None)
    numpy_p.update_outputs(probs)
    assert native_p.class_counts.tolist() == numpy_p.class_counts.tolist()
    for field in ("counts", "count", "min", "max", "mean", "m2"):
        assert np.array_equal(getattr(native_p.confidence, field), getattr(numpy_p.confidence, field)), field
    monkeypatch.undo()
    counts = np.zeros(6, np.int64)
    logits = rng.normal(0, 3, (10, 6))
    edge = np.full((1, 6), 1.0 / 6)
    edge[0, 0] += 2e-2 + 1e-5  # the sum sits on the tolerance
    nan = probs[:3].copy()
    nan[1, 1] = np.nan
    for rows in (logits, edge, nan):
        assert not kernels.fold_outputs(np.ascontiguousarray(rows), counts, np.empty(len(rows)))
    assert counts.tolist() == [0] * 6


def _float32_of_json(text: bytes) -> np.ndarray:
    """What the API's general path makes of a JSON array text: json.loads, then float32."""
    import json

    return np.asarray(json.loads(text), dtype=np.float32).reshape(-1)


@native
def test_parse_floats_rounds_every_number_as_json_loads_then_float32() -> None:
    """The JSON fast path's C parser: the same float32 bits as json.loads + numpy.asarray(float32)
    on numbers unlike the digits (float32 reprs, 17-digit doubles, units from 0.001 to 4000, short
    decimals, exponents, signed zeros), or -1 (the caller then parses with orjson)."""
    import json

    rng = np.random.default_rng(7)
    sets = {
        "float32 reprs of [0, 1] images": rng.random(20000).astype(np.float32).tolist(),
        "17-digit doubles": rng.normal(0, 3, 20000).tolist(),
        "units 0.001 to 4000": (rng.uniform(0.001, 4000, 20000) * rng.choice([-1, 1], 20000)).tolist(),
        "short decimals": np.round(rng.uniform(-100, 100, 20000), 3).tolist(),
    }
    for name, values in sets.items():
        text = json.dumps(values).encode()
        out = np.empty(len(values), dtype=np.float32)
        assert kernels.parse_floats(text, out) == len(values), name
        np.testing.assert_array_equal(
            out.view(np.uint32), _float32_of_json(text).view(np.uint32), err_msg=name
        )
    text = b"[[0, -0.0, 1E3, 2.5e-7], [-1e+2, 123456789012345678, 0.000001, 3.4e20]]"
    out = np.empty(8, dtype=np.float32)
    assert kernels.parse_floats(text, out) == 8
    np.testing.assert_array_equal(out.view(np.uint32), _float32_of_json(text).view(np.uint32))
    assert np.signbit(out[1]) and not np.signbit(out[0])


@native
@pytest.mark.parametrize(
    "text",
    [
        b"[1 2]",  # two numbers in one slot
        b"[1,]",
        b"[,1]",
        b"[01]",
        b"[.5]",
        b"[1.]",
        b"[+1]",
        b"[1e]",
        b"[1][2]",
        b"[1e39]",  # beyond float32: the general path reads inf and the agent refuses it
        b"[1e-50]",  # below float32's normal range
        b"[12345678901234567890]",  # 20 significant digits
        b"[1.0000000596046448]",  # a hair from halfway between two float32 values: the double decides
        b"[1, 2, 3]",  # more numbers than the buffer holds
    ],
)
def test_parse_floats_returns_minus_one_when_unsure(text: bytes) -> None:
    out = np.empty(2, dtype=np.float32)
    assert kernels.parse_floats(text, out) == -1


def test_json_fast_path_equals_the_orjson_path(monkeypatch) -> None:
    """Bodies the C parser declines (near-halfway values) or takes give the same arrays as the
    orjson path (kernels.parse_floats off) and as the general path."""
    import json

    from device_agent.api.bodies import JsonInputs

    rng = np.random.default_rng(3)
    x = rng.random((2, 4, 4, 3)).astype(np.float32)
    x[0, 0, 0, 0] = 1.0000000596046448  # rounds to 1.0 (the double is just below halfway)
    bodies = [
        json.dumps({"inputs": x.tolist()}).encode(),
        json.dumps({"inputs": (x * 4000).tolist()}).encode(),
    ]
    bodies.append(b'{"inputs": [1.0000000596046448' + b", 0.5" * 47 + b"]}")
    shapes = [(4, 4, 3), (4, 4, 3), (48,)]
    got = [JsonInputs(32).fast(b, s) for b, s in zip(bodies, shapes, strict=True)]
    monkeypatch.setattr(kernels, "parse_floats", None)
    ref = [JsonInputs(32).fast(b, s) for b, s in zip(bodies, shapes, strict=True)]
    for g, r, b in zip(got, ref, bodies, strict=True):
        assert g is not None and r is not None
        np.testing.assert_array_equal(g.view(np.uint32), r.view(np.uint32))
        np.testing.assert_array_equal(g.reshape(-1), _float32_of_json(b[len(b'{"inputs": ') : -1]))
