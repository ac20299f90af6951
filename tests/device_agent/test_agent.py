"""The Python API: float in, labels out; violations; windows that merge with the baseline; switching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import device_agent
from device_agent.agent import Agent
from device_agent.formats.manifest import BundleError
from device_agent.formats.stats import baseline_from_dict
from device_agent.formats.telemetry import decode_stats, encode_stats
from device_agent.inference import InputError
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits, onnx_bundle


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return digits()


def test_agent_is_exported_lazily_and_predicts_labels(data: dict[str, np.ndarray]) -> None:
    agent = device_agent.Agent(cached_onnx_bundle())
    pred = agent.predict(data["x_test"][:200])
    assert pred.outputs.shape == (200, 10)
    assert np.allclose(pred.outputs.sum(axis=1), 1.0, atol=1e-4)
    acc = np.mean(np.array(pred.labels) == data["y_test"][:200].astype(str))
    assert acc > 0.9
    one = agent.predict(data["x_test"][0].tolist())  # one sample as nested lists
    assert len(one.labels) == 1 and one.labels[0] == pred.labels[0]
    assert one.model.name == "digits-dense" and len(one.model.sha256) == 64
    assert pred.to_dict()["model"]["version"] == 1


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        (np.zeros((2, 8, 8)), "shape"),
        (np.zeros((8, 8, 1, 1)), "shape"),
        ([[1, 2], [3]], "shape"),
        (np.array([["a"] * 64]).reshape(1, 8, 8, 1), "dtype"),
        (np.full((1, 8, 8, 1), np.nan), "nan"),
    ],
)
def test_bad_inputs_are_refused_and_counted(bad: object, kind: str) -> None:
    agent = Agent(cached_onnx_bundle())
    with pytest.raises(InputError) as e:
        agent.predict(bad)
    assert e.value.kind == kind
    w = agent.close_window()
    assert w.profile.schema_violations == {kind: 1} and w.count == 0
    assert agent.violations_total == 1


def test_window_closes_at_max_samples_and_merges_with_the_baseline(data: dict[str, np.ndarray]) -> None:
    closed = []
    agent = Agent(cached_onnx_bundle(), window_max_samples=100, on_window=closed.append)
    for i in range(0, 300, 50):
        agent.predict(data["x_test"][i : i + 50])
    assert [w.count for w in closed] == [100, 100, 100]
    base = baseline_from_dict(json.loads((cached_onnx_bundle() / "baseline.json").read_text()))
    merged = base.merge(closed[0].profile)  # same spec: exact merge
    assert merged.count == base.count + 100
    assert int(closed[0].profile.inputs.count.sum()) == 100 * 64
    assert int(closed[0].profile.latency_ms.count[0]) == 100
    # the wire round trip keeps the profile exactly
    raw = encode_stats(
        device_id="d1",
        fleet="f",
        seq=1,
        window_start=closed[0].window_start,
        window_end=closed[0].window_end,
        model=closed[0].model,
        profile=closed[0].profile,
        stream="00c0ffee00c0ffee",
    )
    back = decode_stats(raw).profile(base.spec)
    assert np.array_equal(back.inputs.counts, closed[0].profile.inputs.counts)
    assert back.class_counts.tolist() == closed[0].profile.class_counts.tolist()


def test_window_closes_on_time_with_a_fake_clock(data: dict[str, np.ndarray]) -> None:
    mono = FakeClock()
    closed = []
    agent = Agent(cached_onnx_bundle(), window_s=10, on_window=closed.append, monotonic=mono)
    agent.predict(data["x_test"][:3])
    mono.t += 9.9
    assert agent.poll_window() is None and agent.window_due_in() == pytest.approx(0.1)
    mono.t += 0.2
    w = agent.poll_window()
    assert w is not None and w.count == 3 and closed == [w]
    mono.t += 10.5
    empty = agent.poll_window()  # an empty window still closes: it becomes a heartbeat
    assert empty is not None and empty.count == 0
    hb = json.loads(
        encode_stats(
            device_id="d1",
            fleet="f",
            seq=2,
            window_start=empty.window_start,
            window_end=empty.window_end,
            model=empty.model,
            profile=empty.profile,
            stream="00c0ffee00c0ffee",
        )
    )
    assert hb["inputs"] is None and hb["count"] == 0


def test_switch_bundle_swaps_and_a_broken_bundle_keeps_the_old_one(tmp_path: Path, data) -> None:
    closed = []
    agent = Agent(cached_onnx_bundle(), on_window=closed.append)
    agent.predict(data["x_test"][:5])
    v2 = onnx_bundle(tmp_path / "v2", version=2)
    new = agent.switch_bundle(v2)
    assert new.ref.version == 2 and agent.model.ref.version == 2
    assert closed[-1].count == 5 and closed[-1].model.version == 1  # the old model's window closed with it
    broken = tmp_path / "broken"
    shutil.copytree(v2, broken)
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="sha256"):
        agent.switch_bundle(broken)
    assert agent.model.ref.version == 2
    assert agent.predict(data["x_test"][:1]).model.version == 2


def test_signed_bundles_need_a_trusted_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    from device_agent.formats.manifest import sign_manifest

    b = shutil.copytree(cached_onnx_bundle(), tmp_path / "b")
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    (b / "manifest.sig").write_bytes(sign_manifest((b / "manifest.json").read_bytes(), raw))
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert Agent(b, trusted_keys=[pub]).model.ref.version == 1
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with pytest.raises(BundleError, match="does not verify"):
        Agent(b, trusted_keys=[other])
    with pytest.raises(BundleError, match="allow_unsigned is false"):
        Agent(cached_onnx_bundle(), allow_unsigned=False)


def test_window_buffering_equals_one_pass_profile(
    data: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Samples one by one, small batches and a batch larger than the buffer give the exact same profile."""
    from device_agent import windows
    from device_agent.windows import Window

    monkeypatch.setattr(windows, "FLUSH_ROWS", 32)
    monkeypatch.setattr(windows, "MIN_FLUSH_ROWS", 32)
    agent = Agent(cached_onnx_bundle())
    m = agent.model
    x = data["x_test"][:359]
    scores = m.predictor.predict(x)
    w = Window(m.spec, m.ref, 0.0, 0.0)
    assert w._rows == 32 and len(x) - 310 > 32
    for i in range(300):
        w.record(x[i : i + 1], scores[i : i + 1], 1.0)
    w.record(x[300:310], scores[300:310], 10.0)
    w.record(x[310:], scores[310:], float(len(x) - 310))  # larger than the buffer
    got = w.close(1.0).profile
    ref = m.spec.new_profile()
    ref.update_inputs(x)
    ref.update_outputs(scores)
    ref.update_latency(np.ones(len(x)))
    assert got.count == len(x)
    assert np.array_equal(got.inputs.counts, ref.inputs.counts)
    assert np.allclose(got.inputs.mean, ref.inputs.mean) and np.allclose(got.inputs.m2, ref.inputs.m2)
    assert got.class_counts.tolist() == ref.class_counts.tolist()
    assert np.array_equal(got.confidence.counts, ref.confidence.counts)
    assert np.array_equal(got.latency_ms.counts, ref.latency_ms.counts)


def test_image_window_buffers_raw_inputs_and_equals_one_pass_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large images are summarised per channel; batching the summaries changes nothing."""
    from device_agent import windows
    from device_agent.formats.stats import build_baseline
    from device_agent.formats.telemetry import ModelRef
    from device_agent.windows import Window

    monkeypatch.setattr(windows, "SUMMARY_FLUSH_ROWS", 128)

    rng = np.random.default_rng(0)
    x = (rng.random((300, 96, 96, 3)) * 255).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), 300)
    spec = build_baseline(x, probs, ["a", "b", "c", "d"]).spec
    assert spec.features.kind == "image_summary"
    w = Window(spec, ModelRef("m", 1, "0" * 64), 0.0, 0.0)
    # Single samples, a batch, and folds into the profile in the middle all happen below.
    assert w._rows == 128
    for i in range(250):
        w.record(x[i : i + 1], probs[i : i + 1], 1.0)
    w.record(x[250:270], probs[250:270], 20.0)
    for i in range(270, 300):
        w.record(x[i : i + 1], probs[i : i + 1], 1.0)
    got = w.close(1.0).profile
    ref = spec.new_profile()
    ref.update_inputs(x)
    ref.update_outputs(probs)
    assert got.count == 300
    assert np.array_equal(got.inputs.counts, ref.inputs.counts)
    assert np.allclose(got.inputs.mean, ref.inputs.mean) and np.allclose(got.inputs.m2, ref.inputs.m2)
    assert got.class_counts.tolist() == ref.class_counts.tolist()
