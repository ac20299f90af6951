"""Capturer with a real SQLite samples outbox (issue 14 item 1): rates, budget, disk cap, order."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from device_agent.capture import Capturer, open_samples_outbox
from device_agent.config import CaptureSettings
from device_agent.formats.samples import decode_samples


def _capturer(tmp_path: Path, **kw: float) -> Capturer:
    s = CaptureSettings(**kw)  # type: ignore[arg-type]
    return Capturer(
        s,
        open_samples_outbox(tmp_path, s),
        fleet="f",
        device_id="pi-1",
        rng=random.Random(3),
        clock=lambda: 7200.0,
    )


def _drain(c: Capturer) -> list[np.ndarray]:
    out = []
    for row in c.outbox.pending(limit=10_000):
        assert row.topic == "edgefleet/f/pi-1/samples"
        for s in decode_samples(row.payload, "pi-1", "f").samples:
            out.append(np.frombuffer(s.data, dtype=s.dtype).reshape(s.shape))
    return out


def _offer(c: Capturer, x: np.ndarray, start: int) -> int:
    n = len(x)
    outs = np.full((n, 2), 0.5, dtype=np.float32)
    return c.offer(x, outs, [0] * n, [f"p{start + i}" for i in range(n)], "a" * 64, "1")


def test_rate_one_captures_every_input_bit_exact_in_order(tmp_path: Path) -> None:
    c = _capturer(tmp_path, sample_rate=1.0)
    rng = np.random.default_rng(0)
    img = rng.random((5, 12, 12, 3), dtype=np.float32)  # [0,1] 3-channel images
    tab = (rng.random((4, 6)) * np.array([0.001, 0.1, 1, 50, 900, 4000])).astype(np.float64)
    assert _offer(c, img, 0) == 5 and _offer(c, tab, 5) == 4
    assert c.flush() >= 1
    got = _drain(c)
    want = list(img) + list(tab)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert c.counts()["captured"] == 9


def test_rate_zero_captures_nothing_until_alert(tmp_path: Path) -> None:
    c = _capturer(tmp_path, sample_rate=0.0, on_alert_rate=1.0)
    x = np.ones((3, 4), dtype=np.float32)
    assert _offer(c, x, 0) == 0 and c.flush() == 0 and c.outbox.depth() == (0, 0)
    c.set_alert(True)
    assert _offer(c, x, 3) == 3


def test_fractional_rate_and_hourly_budget(tmp_path: Path) -> None:
    c = _capturer(tmp_path, sample_rate=0.25, max_samples_per_hour=10**6)
    n = _offer(c, np.zeros((2000, 2), dtype=np.float32), 0)
    assert 400 < n < 600
    c2 = _capturer(tmp_path / "b", sample_rate=1.0, max_samples_per_hour=7)
    assert _offer(c2, np.zeros((20, 2), dtype=np.float32), 0) == 7
    assert c2.counts()["skipped_hourly_budget"] == 13


def test_disk_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    c = _capturer(tmp_path, sample_rate=1.0, max_disk_bytes=64 * 1024)
    x = np.random.default_rng(2).random((40, 32, 32, 3), dtype=np.float32)  # 12 KB each, ~16 KB as text
    for i in range(len(x)):
        _offer(c, x[i : i + 1], i)
        c.flush()  # one message per sample
    got = _drain(c)
    counts = c.counts()
    assert counts["dropped_messages_disk_cap"] == 40 - len(got) > 0
    assert counts["pending_bytes"] <= 64 * 1024
    # the newest survive, in order
    assert [g.tobytes() for g in got] == [r.tobytes() for r in x[40 - len(got) :]]
