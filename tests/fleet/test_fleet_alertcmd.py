"""The evaluator's per-device alert commands (toolchain.fleet.alertcmds) on a real SQLite store."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.formats.alertcmd import decode_alert_command
from device_agent.formats.stats import Profile
from device_agent.formats.telemetry import ModelRef
from toolchain.fleet.alerts import Evaluator
from toolchain.fleet.ingest import Incoming, Ingestor
from toolchain.fleet.registry import BaselineCache, register_bundle
from toolchain.fleet.sim import stats_payload, window_profile, write_bundle
from toolchain.fleet.storage import open_store

FAST = {"raise_after": 1, "clear_after": 1, "min_count": 250}
N = 300  # predictions per window: one window per evaluation


class ListSink:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish_alert(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))

    def commands(self) -> list[Any]:
        return [decode_alert_command(p) for t, p in self.published if t.endswith("/cmd/alert")]


def _noise(digits_model: tuple[Profile, Any], n: int, seed: int) -> Profile:
    """Inputs unlike the digits: uniform over [0, 16] in every pixel (no strokes, no blank border)."""
    base, model = digits_model
    x = np.random.default_rng(seed).uniform(0, 16, (n, 8, 8, 1))
    return window_profile(base.spec, x, model.predict(x))


def _store(url: str, device: str, seqs: range, ref: ModelRef, prof: Profile) -> None:
    msgs = [stats_payload(device, s, ref, prof) for s in seqs]
    with open_store(url) as s:
        Ingestor(s, BaselineCache(s)).process([Incoming(t, p, i, 1, 0, 0.0) for i, (t, p) in enumerate(msgs)])


def _evaluate(url: str, sink: ListSink | None, now: float) -> Evaluator:
    with open_store(url) as s:
        ev = Evaluator(s, BaselineCache(s), sink=sink, clock=lambda: now)
        ev.evaluate_many([("lab", "pi-1")])
    return ev


def test_enter_leave_and_model_reset_publish_one_command_each(
    tmp_path: Path,
    sqlite_url: str,
    digits_model: tuple[Profile, Any],
    make_window: Callable[..., Profile],
) -> None:
    bundle, sha = write_bundle(tmp_path / "b1", digits_model[0])
    register_bundle(sqlite_url, bundle, FAST)
    ref = ModelRef("digits", 1, sha)
    sink = ListSink()
    _store(sqlite_url, "pi-1", range(1, 2), ref, make_window(N, 1))
    _evaluate(sqlite_url, sink, 1000.0)
    assert sink.commands() == []  # ok -> ok: nothing to say
    _store(sqlite_url, "pi-1", range(3, 4), ref, _noise(digits_model, N, 2))
    _evaluate(sqlite_url, sink, 2000.5)
    (c,) = sink.commands()
    assert c.in_alert and c.state == "alert" and c.seq == 2_000_500_000 and c.model_sha256 == sha
    assert c.reason and c.reason.startswith("drift alert: ") and c.score is not None and c.score > 0.2
    _store(sqlite_url, "pi-1", range(5, 6), ref, _noise(digits_model, N, 3))
    _evaluate(sqlite_url, sink, 3000.0)
    assert len(sink.commands()) == 1  # still in alert: no new command
    _store(sqlite_url, "pi-1", range(7, 8), ref, make_window(N, 4))
    _evaluate(sqlite_url, sink, 4000.0)
    c = sink.commands()[-1]
    assert not c.in_alert and c.seq == 4_000_000_000 and c.reason.startswith("drift back to")
    # In alert again, then the device serves another model: its state starts over -> out of alert.
    _store(sqlite_url, "pi-1", range(9, 10), ref, _noise(digits_model, N, 5))
    _evaluate(sqlite_url, sink, 5000.0)
    assert sink.commands()[-1].in_alert
    b2, sha2 = write_bundle(tmp_path / "b2", digits_model[0], version=2)
    register_bundle(sqlite_url, b2, {**FAST, "raise_after": 3})
    _store(sqlite_url, "pi-1", range(11, 12), ModelRef("digits", 2, sha2), _noise(digits_model, N, 6))
    _evaluate(sqlite_url, sink, 6000.0)
    c = sink.commands()[-1]
    assert not c.in_alert and c.model_sha256 == sha2 and "now serves digits v2" in (c.reason or "")
    seqs = [c.seq for c in sink.commands()]
    assert seqs == sorted(seqs) and len(seqs) == 4
    assert all(t == "edgefleet/lab/pi-1/cmd/alert" for t, _ in sink.published if "cmd" in t)


def test_without_a_sink_the_command_is_counted_and_logged(
    tmp_path: Path,
    sqlite_url: str,
    digits_model: tuple[Profile, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle, sha = write_bundle(tmp_path / "b1", digits_model[0])
    register_bundle(sqlite_url, bundle, FAST)
    _store(sqlite_url, "pi-1", range(1, 2), ModelRef("digits", 1, sha), _noise(digits_model, N, 2))
    caplog.set_level(logging.ERROR, "edgefleet.fleet.alertcmds")
    ev = _evaluate(sqlite_url, None, 2000.0)
    assert ev.commands.as_dict() == {"sent": 0, "queued_offline": 0, "unsent": 1}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "edgefleet/lab/pi-1/cmd/alert NOT published" in line and "database-only" in line


def test_a_collector_without_an_mqtt_client_counts_the_command_unsent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from toolchain.fleet.collector import Collector

    col = Collector("sqlite:///unused.db", "mqtt://127.0.0.1:1")  # never started: no client
    from device_agent.formats.alertcmd import encode_alert_command

    cmd = encode_alert_command(fleet="lab", device_id="pi-001", in_alert=True, seq=5_000)
    col.publish_alert("edgefleet/lab/pi-001/cmd/alert", cmd)
    assert col.alert_commands.as_dict() == {"sent": 0, "queued_offline": 0, "unsent": 1}
    assert any("NOT published" in r.getMessage() for r in caplog.records)
