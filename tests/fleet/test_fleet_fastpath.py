"""The collector's fast window decoder agrees with the contract decoders (decode_stats + profile)."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest

from device_agent.formats.telemetry import ModelRef, TelemetryError, decode_stats
from toolchain.fleet.fastpath import Refused, decode_window
from toolchain.fleet.sim import stats_payload
from toolchain.fleet.storage import Layout, pack_profile


@pytest.fixture
def setup(digits_model, make_window):
    base, _ = digits_model
    layout = Layout.of(base.spec)
    ref = ModelRef("digits", 3, "ab" * 32)
    lookup = {ref.sha256: (layout, base.spec.spec_hash())}.get
    return base, layout, ref, lookup


def contract(raw: bytes, base) -> tuple[bytes, bytes] | None:
    """What the contract path makes of a payload: packed arrays, or None when it refuses."""
    try:
        msg = decode_stats(raw, topic_device="dev-1", topic_fleet="lab")
        if msg.heartbeat:
            return (b"", b"") if msg.spec_hash == base.spec.spec_hash() else None
        return pack_profile(msg.profile(base.spec))
    except TelemetryError:
        return None


def fast(raw: bytes, lookup) -> tuple[bytes, bytes] | None:
    try:
        w = decode_window(raw, "lab", "dev-1", lookup)
    except Refused:
        return None
    return (w.ints or b"", w.floats or b"")


def test_accepted_windows_pack_exactly_like_the_contract(setup, make_window) -> None:
    base, _, ref, lookup = setup
    for seed in range(5):
        prof = make_window(40 + seed, seed=seed)
        prof.add_violation("shape", seed)
        _, raw = stats_payload("dev-1", seed, ref, prof, dropped=seed)
        got = decode_window(raw, "lab", "dev-1", lookup)
        want = contract(raw, base)
        assert want is not None and (got.ints, got.floats) == want
        assert got.seq == seed and got.dropped_windows == seed and got.count == 40 + seed
        assert got.schema_violations == {"shape": seed}


def _mutations(doc: dict, rng: random.Random) -> list[tuple[str, dict | bytes]]:
    """Corruptions of a valid window, each in one place."""
    out: list[tuple[str, dict | bytes]] = []

    def mut(name: str, fn) -> None:
        d = copy.deepcopy(doc)
        fn(d)
        out.append((name, d))

    paths = [("inputs",), ("outputs", "confidence"), ("latency_ms",)]
    for path in paths:

        def get(d, path=path):
            for k in path:
                d = d[k]
            return d

        j = rng.randrange(len(get(doc)["hist"]))
        mut(f"{path} hist short", lambda d, g=get, j=j: g(d)["hist"][j].pop())
        mut(f"{path} hist long", lambda d, g=get, j=j: g(d)["hist"][j].append(0))
        mut(f"{path} hist negative", lambda d, g=get, j=j: g(d)["hist"][j].__setitem__(0, -1))
        mut(f"{path} hist float", lambda d, g=get, j=j: g(d)["hist"][j].__setitem__(0, 1.5))
        mut(f"{path} hist bool", lambda d, g=get, j=j: g(d)["hist"][j].__setitem__(0, True))
        mut(f"{path} hist string", lambda d, g=get, j=j: g(d)["hist"][j].__setitem__(0, "3"))
        mut(f"{path} hist sum", lambda d, g=get, j=j: g(d)["hist"][j].__setitem__(1, g(d)["hist"][j][1] + 1))
        mut(f"{path} count wrong", lambda d, g=get, j=j: g(d)["count"].__setitem__(j, g(d)["count"][j] + 1))
        mut(f"{path} nan negative", lambda d, g=get, j=j: g(d)["nan"].__setitem__(j, -1))
        mut(f"{path} m2 negative", lambda d, g=get, j=j: g(d)["m2"].__setitem__(j, -0.5))
        mut(f"{path} mean string", lambda d, g=get, j=j: g(d)["mean"].__setitem__(j, "1.0"))
        mut(f"{path} min null", lambda d, g=get, j=j: g(d)["min"].__setitem__(j, None))
        mut(f"{path} max huge", lambda d, g=get, j=j: g(d)["max"].__setitem__(j, 1e308))
        mut(f"{path} list short", lambda d, g=get: g(d)["mean"].pop())
        mut(f"{path} extra key", lambda d, g=get: g(d).__setitem__("p99", []))
        mut(f"{path} missing key", lambda d, g=get: g(d).pop("m2"))
    mut("class counts short", lambda d: d["outputs"]["class_counts"].pop())
    mut(
        "class counts sum",
        lambda d: d["outputs"]["class_counts"].__setitem__(0, d["outputs"]["class_counts"][0] + 1),
    )
    mut("count", lambda d: d.__setitem__("count", d["count"] + 1))
    mut("seq negative", lambda d: d.__setitem__("seq", -1))
    mut("seq float", lambda d: d.__setitem__("seq", 1.0))
    mut("spoofed", lambda d: d.__setitem__("device_id", "dev-2"))
    mut("fleet", lambda d: d.__setitem__("fleet", "other"))
    mut("spec hash", lambda d: d.__setitem__("spec_hash", "0" * 64))
    mut("model sha", lambda d: d["model"].__setitem__("sha256", "AB" * 32))
    mut("model version 0", lambda d: d["model"].__setitem__("version", 0))
    mut("window order", lambda d: d.__setitem__("window_end", "2000-01-01T00:00:00.000Z"))
    mut("local time", lambda d: d.__setitem__("window_start", "2026-11-27T10:00:00+01:00"))
    mut("violations", lambda d: d.__setitem__("schema_violations", {"shape": -1}))
    mut("agent long", lambda d: d.__setitem__("agent_version", "x" * 41))
    mut("unknown key", lambda d: d.__setitem__("extra", 1))
    mut("half heartbeat", lambda d: d.__setitem__("inputs", None))
    mut("heartbeat with count", lambda d: d.update(inputs=None, outputs=None, latency_ms=None))
    mut("heartbeat", lambda d: d.update(inputs=None, outputs=None, latency_ms=None, count=0))
    mut("schema true", lambda d: d.__setitem__("schema", True))
    raw = json.dumps(doc).encode()
    out.append(("NaN", raw.replace(b'"count": ', b'"count": NaN, "x": ', 1)))
    out.append(("Infinity literal", raw.replace(b'"m2": [', b'"m2": [1e999, ', 1)))
    out.append(("truncated", raw[:-10]))
    out.append(("deep", raw[:-1] + b', "z": ' + b"[" * 60 + b"]" * 60 + b"}"))
    return out


def test_fast_path_never_accepts_what_the_contract_refuses(setup, make_window) -> None:
    base, _, ref, lookup = setup
    rng = random.Random(7)
    checked = 0
    for seed in range(3):
        _, raw = stats_payload("dev-1", seed, ref, make_window(30, seed=seed))
        for name, mutated in _mutations(json.loads(raw), rng):
            payload = mutated if isinstance(mutated, bytes) else json.dumps(mutated).encode()
            got, want = fast(payload, lookup), contract(payload, base)
            if got is not None:
                assert want is not None, f"{name}: fast path accepted what the contract refuses"
                assert got == want, f"{name}: packed differently"
            checked += 1
    assert checked > 150


def test_unknown_model_is_left_to_the_contract_path(setup, make_window) -> None:
    _, _, ref, _ = setup
    _, raw = stats_payload("dev-1", 0, ref, make_window(10))
    with pytest.raises(Refused, match="no baseline"):
        decode_window(raw, "lab", "dev-1", lambda sha: None)


def test_packed_layout_round_trips(setup, make_window) -> None:
    from toolchain.fleet.storage import merge_packed

    base, layout, ref, lookup = setup
    prof = make_window(25, seed=4)
    _, raw = stats_payload("dev-1", 0, ref, prof)
    w = decode_window(raw, "lab", "dev-1", lookup)
    back = merge_packed(layout, [(w.ints, w.floats)])
    assert np.array_equal(back.inputs.counts, prof.inputs.counts)
    assert np.array_equal(back.class_counts, prof.class_counts)
    assert np.allclose(back.inputs.mean, prof.inputs.mean)


def test_window_with_a_feature_that_saw_only_nan_packs_like_the_contract(setup, make_window) -> None:
    """min/max/mean are null for a feature without values: the fast path fills them as the contract."""
    base, _, ref, lookup = setup

    def blank_first_pixel(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32).copy()
        x.reshape(len(x), -1)[:, 0] = np.nan
        return x

    prof = make_window(20, seed=3, transform=blank_first_pixel)
    _, raw = stats_payload("dev-1", 0, ref, prof)
    assert json.loads(raw)["inputs"]["min"][0] is None
    got = decode_window(raw, "lab", "dev-1", lookup)
    assert (got.ints, got.floats) == contract(raw, base)


def test_labelled_windows_agree_on_both_paths_and_bad_feedback_is_refused(setup, make_window) -> None:
    """Schema 3 (ground truth): the fast path keeps the same counts as the contract decoder."""
    base, _, ref, lookup = setup
    prof = make_window(30, seed=11)
    for t, p in [(3, 3), (3, 5), (0, 0), (9, 9)]:
        prof.add_label(t, p)
    _, raw = stats_payload("dev-1", 1, ref, prof)
    assert json.loads(raw)["schema"] == 3
    got = decode_window(raw, "lab", "dev-1", lookup)
    msg = decode_stats(raw, topic_device="dev-1", topic_fleet="lab")
    assert (got.ints, got.floats) == contract(raw, base)
    assert got.feedback is not None and msg.feedback is not None
    assert got.feedback.to_dict() == msg.feedback.to_dict()
    assert (got.feedback.labelled, got.feedback.correct) == (4, 3)
    doc = json.loads(raw)
    doc["feedback"]["confusion"] = [[0] * 3 for _ in range(3)]  # not the baseline's 10 x 10
    with pytest.raises(Refused):
        decode_window(json.dumps(doc).encode(), "lab", "dev-1", lookup)
    doc["feedback"] = {"labelled": 4, "correct": 5, "confusion": None}
    with pytest.raises(Refused):
        decode_window(json.dumps(doc).encode(), "lab", "dev-1", lookup)
    with pytest.raises(TelemetryError):
        decode_stats(json.dumps(doc).encode())
