"""Captured-samples wire format and the [capture] config section (issue 14 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import ConfigError, parse_config
from device_agent.formats.samples import (
    MAX_SAMPLES_PACKET_BYTES,
    Sample,
    decode_samples,
    encode_samples,
    pack_samples,
)
from device_agent.formats.telemetry import TelemetryError

STREAM = "0123456789abcdef"


def _sample(i: int, x: np.ndarray) -> Sample:
    return Sample(
        f"p{i}", 1_700_000_000.0 + i, "a" * 64, "3", str(x.dtype), x.shape, x.tobytes(), i % 2, (0.25, 0.75)
    )


def test_roundtrip_is_bit_exact_for_unlike_inputs() -> None:
    rng = np.random.default_rng(7)
    xs = [
        rng.random((16, 16, 3), dtype=np.float32),  # [0,1] 3-channel image
        (rng.random(5) * np.array([0.001, 1, 40, 900, 4000])).astype(np.float64),  # wide tabular
        np.array([[np.float32(-0.0), np.float32(1e-45)]], dtype=np.float32),  # -0 and a subnormal
        rng.integers(0, 256, (8, 8), dtype=np.uint8),
    ]
    msg = encode_samples(
        device_id="pi-1", fleet="f", stream=STREAM, seq=3, samples=[_sample(i, x) for i, x in enumerate(xs)]
    )
    back = decode_samples(msg, topic_device="pi-1", topic_fleet="f")
    assert back.seq == 3 and back.stream == STREAM
    for x, s in zip(xs, back.samples, strict=True):
        y = np.frombuffer(s.data, dtype=s.dtype).reshape(s.shape)
        assert y.dtype == x.dtype and y.shape == x.shape and y.tobytes() == x.tobytes()
    assert [s.id for s in back.samples] == ["p0", "p1", "p2", "p3"]


def test_pack_keeps_order_and_stays_under_the_packet_limit() -> None:
    x = np.random.default_rng(1).random((64, 64, 3), dtype=np.float32)  # 48 KB raw, ~64 KB base64
    small = [_sample(i, x[:20]) for i in range(12)]
    batches = pack_samples(small)
    assert len(batches) > 1
    assert [s.id for b in batches for s in b] == [s.id for s in small]
    for seq, b in enumerate(batches):
        raw = encode_samples(device_id="pi-1", fleet="f", stream=STREAM, seq=seq, samples=b)
        assert len(raw) <= MAX_SAMPLES_PACKET_BYTES
    with pytest.raises(TelemetryError, match="does not fit"):
        pack_samples([_sample(0, x)])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["samples"][0].update(shape=[3]), "do not match"),
        (lambda d: d["samples"][0].update(dtype="object"), "dtype"),
        (lambda d: d["samples"][0].update(data="!!"), "base64"),
        (lambda d: d["samples"][0].update(extra=1), "unknown|extra"),
        (lambda d: d.update(device_id="other"), "spoofed"),
        (lambda d: d["samples"][0].update(scores=[True]), "numbers"),
        (lambda d: d.update(samples=[]), "1.."),
    ],
)
def test_decoder_is_strict(mutate, match) -> None:  # type: ignore[no-untyped-def]
    x = np.arange(4, dtype=np.float32)
    d = json.loads(encode_samples(device_id="pi-1", fleet="f", stream=STREAM, seq=0, samples=[_sample(0, x)]))
    mutate(d)
    with pytest.raises(TelemetryError, match=match):
        decode_samples(json.dumps(d).encode(), topic_device="pi-1", topic_fleet="f")


def _cfg(extra: dict) -> dict:  # type: ignore[type-arg]
    return {"agent": {"device_id": "pi-1", "fleet": "f", "bundle": "b", "state_dir": "s"}, **extra}


def test_capture_is_off_by_default_and_validated(tmp_path: Path) -> None:
    cfg = parse_config(_cfg({}), tmp_path)
    assert not cfg.capture.enabled and cfg.capture.sample_rate == 0.0
    cfg = parse_config(
        _cfg(
            {
                "capture": {
                    "sample_rate": 0.1,
                    "on_alert_rate": 1,
                    "max_samples_per_hour": 50,
                    "max_disk_bytes": 1 << 20,
                }
            }
        ),
        tmp_path,
    )
    assert cfg.capture.enabled and cfg.capture.on_alert_rate == 1.0 and cfg.capture.max_samples_per_hour == 50
    for bad, match in (
        ({"sample_rate": 1.5}, "between 0 and 1"),
        ({"max_disk_bytes": 10}, ">= 65536"),
        ({"rate": 1}, "rate"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_config(_cfg({"capture": bad}), tmp_path)
