"""The sample_labels message (ground truth for captured samples) and the capturer's label queue."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from device_agent.capture import Capturer, open_samples_outbox
from device_agent.config import CaptureSettings
from device_agent.formats.samplelabels import (
    LABELS_TYPE,
    MAX_LABELS_PACKET_BYTES,
    SampleLabel,
    decode_sample_labels,
    encode_sample_labels,
    pack_labels,
    payload_type,
)
from device_agent.formats.samples import decode_samples
from device_agent.formats.telemetry import TelemetryError

STREAM = "0123456789abcdef"


def _enc(labels: list[SampleLabel], device: str = "pi-1") -> bytes:
    return encode_sample_labels(device_id=device, fleet="f", stream=STREAM, seq=4, labels=labels)


def test_round_trip_and_type_sniffing() -> None:
    labels = [
        SampleLabel("a-1", "fault", 1, 1_800_000_000.25),
        SampleLabel("b_2", "ñormal ✓", 0, 1_800_000_001.0),
    ]
    raw = _enc(labels)
    assert payload_type(raw) == LABELS_TYPE
    msg = decode_sample_labels(raw, "pi-1", "f")
    assert (msg.device_id, msg.fleet, msg.stream, msg.seq) == ("pi-1", "f", STREAM, 4)
    assert msg.labels == labels


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d["labels"][0].update(id="has space"), "id must be"),
        (lambda d: d["labels"][0].update(extra=1), "extra"),
        (lambda d: d["labels"][0].update(index=-1), "index"),
        (lambda d: d["labels"][0].update(index=True), "index"),
        (lambda d: d["labels"][0].update(label="x" * 200), "label"),
        (lambda d: d.update(labels=[]), "1..512"),
        (lambda d: d.update(device_id="pi-2"), "does not match"),
        (lambda d: d.update(schema=2), "schema"),
        (lambda d: d.update(type="samples"), "not 'sample_labels'"),
    ],
)
def test_decode_refuses_in_words(change, words: str) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(_enc([SampleLabel("a", "ok", 0, 1.0)]))
    change(d)
    with pytest.raises(TelemetryError, match=words):
        decode_sample_labels(json.dumps(d).encode(), "pi-1", "f")


def test_pack_keeps_order_and_every_message_under_the_limit() -> None:
    # long non-ASCII class names are escaped 6 bytes a character by JSON: size, not count, must split
    labels = [SampleLabel(f"id{i:05d}", "é" * 128, i % 7, 1.0 + i) for i in range(1500)]
    batches = pack_labels(labels)
    assert len(batches) > 3 and [x for b in batches for x in b] == labels
    for b in batches:
        assert len(_enc(b)) <= MAX_LABELS_PACKET_BYTES


def test_capturer_sends_labels_of_captured_ids_and_counts_the_rest(tmp_path: Path) -> None:
    s = CaptureSettings(sample_rate=1.0, max_samples_per_hour=2)  # type: ignore[call-arg]
    c = Capturer(
        s,
        open_samples_outbox(tmp_path, s),
        fleet="f",
        device_id="pi-1",
        rng=random.Random(1),
        clock=lambda: 7200.0,
    )
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert c.offer(x, np.full((3, 2), 0.5, np.float32), [0, 1, 0], ["p0", "p1", "p2"], "a" * 64, "1") == 2
    c.label("p1", "b", 1)
    c.label("p2", "a", 0)  # over the hourly budget: not captured
    c.label("never", "a", 0)
    c.label("p1", "a", 0)  # a second label of one id is not sent
    assert c.flush() == 2  # one samples message, then one labels message
    rows = c.outbox.pending(limit=10)
    assert [len(decode_samples(rows[0].payload, "pi-1", "f").samples)] == [2]
    assert decode_sample_labels(rows[1].payload, "pi-1", "f").labels == [SampleLabel("p1", "b", 1, 7200.0)]
    h = c.counts()
    assert (h["labels_sent"], h["labels_not_captured"]) == (1, 3)
    c.label("p0", "a", 0)  # a label after its sample left: sent alone
    assert c.flush() == 1
    assert payload_type(c.outbox.pending(limit=10)[-1].payload) == LABELS_TYPE


def test_sample_size_without_encoding_agrees_with_the_encoding() -> None:
    """The capture path sizes samples arithmetically (sample_fits, pack_samples): it must be exact."""
    from device_agent.formats.samples import Sample, _sample_json, _sample_size

    rng = np.random.default_rng(0)
    versions = [None, "1", 'é"x', "a\\b", "12345678", "\x01"]
    for i in range(1500):
        dt = str(rng.choice(["uint8", "float32", "float64", "int16"]))
        shape = tuple(int(v) for v in rng.integers(0, 60, rng.integers(0, 4)))
        n = int(np.prod(shape)) if shape else 1
        data = rng.integers(0, 256, n * np.dtype(dt).itemsize, dtype=np.uint8).tobytes()
        scores = tuple(
            float(v) for v in rng.normal(0, 10.0 ** float(rng.integers(-30, 30)), rng.integers(0, 12))
        )
        ts = float(rng.uniform(-1e9, 2.5e11))  # before 1970 and after 9999 too
        s = Sample(
            f"id{i}", ts, "ab" * 32, versions[i % 6], dt, shape, data, int(rng.integers(0, 10**6)), scores
        )
        assert _sample_size(s) == len(_sample_json(s)), s
