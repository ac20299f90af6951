"""Capture through the real daemon and a real Mosquitto (issue 14 item 1): bit-exact, in order,
off by default, delivered after an outage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.formats.samples import decode_samples
from tests.device_agent.agent_bundles import cached_onnx_bundle
from tests.device_agent.agent_helpers import (
    Collector,
    captured_samples,
    http,
    persist,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("fast_reconnect")]


def _daemon(tmp_path: Path, url: str, capture: str) -> Daemon:
    cfg = write_config(
        tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state", url=url
    )
    cfg.write_text(cfg.read_text() + capture)
    return Daemon(load_config(cfg)).start()


def _samples(col: Collector) -> list[np.ndarray]:
    out, seen = [], set()
    for _topic, payload, *_ in col.of_kind("samples"):
        msg = decode_samples(payload, "pi-001", "lab")
        if msg.seq in seen:  # QoS 1 may deliver twice; a consumer keeps each seq once
            continue
        seen.add(msg.seq)
        out += [np.frombuffer(s.data, dtype=s.dtype).reshape(s.shape) for s in msg.samples]
    return out


def _inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    wide = (rng.random((3, 64)) * np.geomspace(0.001, 4000, 64)).reshape(
        3, 8, 8, 1
    )  # tabular, wide scales, float64 as sent
    unit = rng.random((2, 8, 8, 1), dtype=np.float32)  # [0,1]
    return [wide, unit[0], unit[1:]]


@pytest.mark.timeout(60)
def test_rate_one_delivers_raw_inputs_bit_exact_in_order(tmp_path: Path, mosquitto) -> None:
    col = Collector(mosquitto.port)
    d = _daemon(tmp_path, mosquitto.url, "\n[capture]\nsample_rate = 1.0\n")
    xs = _inputs()
    try:
        for x in xs:
            d.agent.predict(x)
        wait_for(lambda: len(_samples(col)) >= 5, what="5 captured samples")
        assert d.health()["capture"]["captured"] == 5
    finally:
        d.stop()
        col.close()
    want = [r for x in xs for r in (x if x.ndim == 4 else x[None])]
    got = _samples(col)
    assert len(got) == 5
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.timeout(60)
def test_capture_off_by_default_sends_nothing(tmp_path: Path, mosquitto) -> None:
    col = Collector(mosquitto.port)
    d = _daemon(tmp_path, mosquitto.url, "")
    try:
        for x in _inputs():
            d.agent.predict(x)
        d.agent.close_window()
        wait_for(lambda: len(col.of_kind("stats")) >= 1, what="a window (proves the link works)")
        assert d.health()["capture"] == {"enabled": False}
    finally:
        d.stop()
        col.close()
    assert col.of_kind("samples") == []
    assert not (tmp_path / "state" / "samples.sqlite3").exists()


@pytest.mark.timeout(90)
def test_broker_down_during_capture_delivered_after(tmp_path: Path, mosquitto) -> None:
    persist(mosquitto)
    col = Collector(mosquitto.port, persistent=True)
    d = _daemon(tmp_path, mosquitto.url, "\n[capture]\nsample_rate = 1.0\n")
    x = np.random.default_rng(9).random((8, 8, 8, 1), dtype=np.float32)
    try:
        d.agent.predict(x[:2])
        wait_for(lambda: len(_samples(col)) >= 2, what="samples before the outage")
        mosquitto.stop()
        wait_for(lambda: not d.publisher.connected, what="agent noticing the outage")
        for i in range(2, 8):
            d.agent.predict(x[i])
        wait_for(lambda: d.capturer.outbox.depth()[0] >= 1, what="samples queued on disk")
        mosquitto.start()
        wait_for(lambda: d.capturer.outbox.depth()[0] == 0, what="samples outbox drained")
        wait_for(lambda: len(_samples(col)) >= 8, what="all 8 samples at the subscriber")
    finally:
        d.stop()
        col.close()
    assert [g.tobytes() for g in _samples(col)] == [r.tobytes() for r in x]


@pytest.mark.timeout(60)
def test_disk_cap_through_the_daemon_drops_oldest_and_counts(tmp_path: Path) -> None:
    # no [mqtt]: samples stay on disk, the cap applies
    cfg = write_config(tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state")
    cfg.write_text(cfg.read_text() + "\n[capture]\nsample_rate = 1.0\nmax_disk_bytes = 65536\n")
    d = Daemon(load_config(cfg)).start()
    x = np.random.default_rng(4).random((600, 8, 8, 1))  # float64, ~700 bytes per sample as text
    try:
        for i in range(0, 600, 100):
            d.agent.predict(x[i : i + 100])
            d.writer.flush_capture()
        h = d.health()["capture"]
        assert h["captured"] == 600
        assert h["dropped_messages_disk_cap"] > 0 and h["pending_bytes"] <= 65536
        kept = [
            np.frombuffer(s.data, dtype=s.dtype).reshape(s.shape)
            for row in d.capturer.outbox.pending(limit=1000)
            for s in decode_samples(row.payload, "pi-001", "lab").samples
        ]
    finally:
        d.stop()
    assert 0 < len(kept) < 600
    assert [k.tobytes() for k in kept] == [r.tobytes() for r in x[600 - len(kept) :]]  # the newest, in order


def _sample_ids(col: Collector) -> list[str]:
    return [s.id for s in captured_samples(col)]


@pytest.mark.timeout(60)
def test_captured_samples_carry_the_ids_the_api_returned(tmp_path: Path, mosquitto) -> None:
    """A sample captured from /v1/predict names the id the caller got, so feedback joins it."""
    import io
    import urllib.request

    col = Collector(mosquitto.port)
    d = _daemon(tmp_path, mosquitto.url, "\n[capture]\nsample_rate = 1.0\n")
    assert d.api is not None
    base = "http://" + d.api.address
    rng = np.random.default_rng(9)
    returned: list[str] = []
    try:
        batch = rng.random((3, 8, 8, 1)) * 16  # JSON batch
        code, js = http(base, "/v1/predict", {"inputs": batch.tolist()})
        assert code == 200
        returned += js["ids"]
        code, js = http(
            base, "/v1/predict", {"inputs": (rng.random((8, 8, 1)) * 16).tolist()}
        )  # one, unbatched
        assert code == 200
        returned += js["ids"]
        buf = io.BytesIO()
        np.save(buf, rng.random((2, 8, 8, 1), dtype=np.float32))
        req = urllib.request.Request(
            base + "/v1/predict", data=buf.getvalue(), headers={"Content-Type": "application/x-npy"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            returned += json.loads(r.read())["ids"]
        assert len(returned) == 6 and len(set(returned)) == 6
        wait_for(lambda: len(_sample_ids(col)) >= 6, what="6 captured samples")
    finally:
        d.stop()
        col.close()
    assert _sample_ids(col) == returned
