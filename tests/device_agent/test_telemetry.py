"""Strict decoding of the telemetry wire format (device_agent.formats.telemetry)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.formats.stats import build_baseline
from device_agent.formats.telemetry import (
    MAX_PAYLOAD_BYTES,
    ModelRef,
    TelemetryError,
    decode_event,
    decode_stats,
    decode_status,
    encode_event,
    encode_stats,
    encode_status,
    parse_topic,
    topic,
)

MODEL = ModelRef("digits", 2, "ab" * 32)


@pytest.fixture(scope="module")
def baseline(digits: dict):
    x = digits["x"][:400]
    probs = np.eye(10)[digits["y"][:400]] * 0.9 + 0.01
    return build_baseline(x, probs, [str(i) for i in range(10)])


def window(baseline, n: int = 50):
    w = baseline.spec.new_profile()
    rng = np.random.default_rng(n)
    w.update_inputs(rng.integers(0, 17, (n, 8, 8, 1)).astype(float))
    w.update_outputs(rng.dirichlet(np.ones(10), n))
    w.update_latency(rng.random(n))
    w.add_violation("shape", 2)
    return w


def payload(baseline, **kw) -> bytes:
    args = dict(
        device_id="pi-1",
        fleet="demo",
        seq=7,
        window_start=1_800_000_000.0,
        window_end=1_800_000_060.0,
        model=MODEL,
        profile=window(baseline),
        stream="00c0ffee00c0ffee",
    )
    args.update(kw)
    return encode_stats(**args)


def test_topics() -> None:
    assert topic("demo", "pi-1", "stats") == "edgefleet/demo/pi-1/stats"
    assert parse_topic("edgefleet/demo/pi-1/status") == ("demo", "pi-1", "status")
    for bad in (
        "edgefleet/demo/pi-1",
        "/edgefleet/demo/pi-1/stats",
        "edgefleet/Demo/pi-1/stats",
        "x/a/b/stats",
    ):
        with pytest.raises(TelemetryError):
            parse_topic(bad)


def test_stats_round_trip(baseline) -> None:
    raw = payload(baseline)
    assert len(raw) < 8 * 1024
    msg = decode_stats(raw, "pi-1", "demo")
    prof = msg.profile(baseline.spec)
    assert prof.count == 50 and msg.seq == 7 and msg.model == MODEL
    assert prof.schema_violations == {"shape": 2}
    assert np.array_equal(prof.inputs.counts, window(baseline).inputs.counts)


def test_heartbeat_is_small(baseline) -> None:
    raw = payload(baseline, profile=baseline.spec.new_profile())
    msg = decode_stats(raw)
    assert msg.heartbeat and msg.count == 0 and len(raw) < 600


def mutate(raw: bytes, fn) -> bytes:
    doc = json.loads(raw)
    fn(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda d: d.update(schema=3), "schema"),
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d.pop("seq"), "missing"),
        (lambda d: d.update(seq=-1), "seq"),
        (lambda d: d.update(seq=True), "seq"),
        (lambda d: d.update(device_id="pi-2"), "spoofed"),
        (lambda d: d.update(window_end="2020-01-01T00:00:00Z"), "before"),
        (lambda d: d.update(window_start="yesterday"), "ISO"),
        (lambda d: d["inputs"]["hist"].__setitem__(0, [1, 2]), "bins|sums"),
        (lambda d: d["inputs"].update(mean=[0.0]), "entries"),
        (lambda d: d.update(count=3), "count"),
        (lambda d: d.pop("stream"), "missing"),
        (lambda d: d.update(stream="ABCDEF0123456789"), "stream"),
        (lambda d: d.update(stream="00c0ffee"), "stream"),
        (lambda d: d.update(stream=None), "stream"),
        (lambda d: d.update(schema=1), "unknown key"),  # schema 1 has no stream
    ],
)
def test_bad_stats_are_refused(baseline, fn, match: str) -> None:
    raw = mutate(payload(baseline), fn)
    with pytest.raises(TelemetryError, match=match):
        decode_stats(raw, "pi-1", "demo").profile(baseline.spec)


def test_stats_carry_the_stream_and_schema_1_still_decodes(baseline) -> None:
    msg = decode_stats(payload(baseline), "pi-1", "demo")
    assert msg.stream == "00c0ffee00c0ffee" and json.loads(payload(baseline))["schema"] == 2
    old = mutate(payload(baseline), lambda d: (d.pop("stream"), d.update(schema=1)))
    v1 = decode_stats(old, "pi-1", "demo")
    assert v1.stream is None and v1.seq == msg.seq
    assert v1.profile(baseline.spec).count == msg.profile(baseline.spec).count
    with pytest.raises(TelemetryError, match="stream"):
        payload(baseline, stream="not-hex-at-all!!")


def test_nan_huge_and_deep_payloads_are_refused(baseline) -> None:
    raw = payload(baseline).replace(b'"mean":[', b'"mean":[NaN,', 1)
    with pytest.raises(TelemetryError, match="JSON|finite"):
        decode_stats(raw)
    with pytest.raises(TelemetryError, match="exceeds"):
        decode_stats(b" " * (MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(TelemetryError, match="nests"):
        decode_stats(b'{"schema":1,"a":' + b"[" * 5000 + b"]" * 5000 + b"}")
    with pytest.raises(TelemetryError, match="JSON"):
        decode_stats(b"\x00\x01 not json")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_only_raise_telemetry_errors(blob: bytes) -> None:
    for dec in (decode_stats, decode_status, decode_event):
        try:
            dec(blob)
        except TelemetryError:
            pass


def test_status_and_event_round_trip() -> None:
    s = decode_status(
        encode_status(
            device_id="pi-1",
            fleet="demo",
            state="online",
            ts=1.8e9,
            model=MODEL,
            agent_version="0.1.0",
            target="raspberry-pi",
        ),
        "pi-1",
        "demo",
    )
    assert s.state == "online" and s.model == MODEL and s.target == "raspberry-pi"
    e = decode_event(
        encode_event(
            device_id="pi-1",
            fleet="demo",
            event="deploy_failed",
            ts=1.8e9,
            message="hash mismatch",
            detail={"version": 3},
        )
    )
    assert e.event == "deploy_failed" and e.detail == {"version": 3}
    with pytest.raises(TelemetryError, match="spoofed"):
        decode_event(encode_event(device_id="pi-1", fleet="demo", event="error", ts=1.8e9), "pi-9", "demo")
