"""The loop from drift to capture through real parts (issue 14 item 1): a real Mosquitto, the real
collector (drift evaluation, retained ``.../cmd/alert``) and the real agent daemon (ONNX Runtime).

The agent captures nothing normally (``sample_rate = 0``) and everything in alert
(``on_alert_rate = 1``), so what it captures says exactly which rate it uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.formats.alertcmd import alert_command_topic, decode_alert_command, encode_alert_command
from tests.device_agent.agent_bundles import cached_onnx_bundle
from tests.device_agent.agent_helpers import Collector as Listener
from tests.device_agent.agent_helpers import captured_samples, http, wait_for, write_config
from tests.fabricate import digits
from toolchain.fleet.registry import register_bundle

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("fast_reconnect")]

N = 300  # predictions per window (window_max_samples) and per evaluation (min_count)
TOPIC = alert_command_topic("lab", "pi-001")


def _daemon(tmp_path: Path, url: str, *, start: bool = True) -> Daemon:
    cfg = write_config(
        tmp_path / "agent.toml",
        bundle=cached_onnx_bundle(),
        state_dir=tmp_path / "state",
        url=url,
        window_max_samples=N,
    )
    cfg.write_text(
        cfg.read_text()
        + "\n[capture]\nsample_rate = 0.0\non_alert_rate = 1.0\nmax_samples_per_hour = 100000\n"
    )
    d = Daemon(load_config(cfg))
    return d.start() if start else d


def _unlike_digits(n: int, seed: int) -> np.ndarray:
    """Tabular-looking inputs over wide scales (0.001 .. 4000 per column), float64 as a client sends."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, 64)) * np.geomspace(0.001, 4000, 64)).reshape(n, 8, 8, 1)


def _held_out(n: int, seed: int) -> np.ndarray:
    x = digits()["x_test"]
    return x[np.random.default_rng(seed).choice(len(x), n)]


def _samples(listener: Listener) -> list[bytes]:
    return [s.data for s in captured_samples(listener)]


def _commands(listener: Listener) -> list[tuple[Any, bool]]:
    with listener._lock:
        return [(decode_alert_command(p), r) for t, p, r in listener.messages if t == TOPIC]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 1], ids=["eval-in-thread", "eval-worker-process"])
def test_drift_alert_switches_capture_and_survives_restart_and_clear(
    tmp_path: Path, mosquitto: Any, collector_factory: Callable[..., Any], workers: int
) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    register_bundle(db, cached_onnx_bundle(), {"raise_after": 1, "clear_after": 1, "min_count": N})
    col = collector_factory(db, mosquitto.url, fleet="lab", worker_processes=workers)
    listener = Listener(mosquitto.port)
    d = _daemon(tmp_path, mosquitto.url)
    try:
        assert d.health()["alert_commands"]["in_alert"] is False
        d.agent.predict(_unlike_digits(N, 1))  # one window of drifted inputs (not captured: rate 0)
        wait_for(lambda: d.health()["alert_commands"]["in_alert"], 60, what="the agent in alert")
        (cmd, _retain), *_ = _commands(listener)
        assert cmd.in_alert and cmd.state == "alert" and cmd.reason.startswith("drift alert")
        assert col.alert_commands.as_dict()["sent"] == 1
        assert d.capturer is not None and d.capturer.rate == 1.0 and d.capturer.counts()["captured"] == 0
        x = _unlike_digits(7, 2)
        d.agent.predict(x)  # captured at on_alert_rate: all seven, bit-exact
        wait_for(lambda: len(_samples(listener)) >= 7, 30, what="7 captured samples")
        assert _samples(listener) == [r.tobytes() for r in x]
        h = d.health()["alert_commands"]
        assert h["applied"] == 1 and h["refused_total"] == 0 and h["since"] is not None
        code, text = http("http://" + d.api.address, "/metrics")
        assert code == 200 and "edgefleet_agent_in_alert 1" in text
    finally:
        d.stop()

    # Restart: the state file has it before the broker is reached; the retained command confirms it.
    d = _daemon(tmp_path, mosquitto.url, start=False)
    assert d.health()["alert_commands"]["in_alert"] is True and d.capturer.rate == 1.0
    d.start()
    try:
        wait_for(lambda: d.health()["alert_commands"]["duplicates"] >= 1, 30, what="the retained command")
        assert d.health()["alert_commands"]["refused_total"] == 0
    finally:
        d.stop()
    # Without the file the retained command alone brings the alert back.
    (tmp_path / "state" / "alert_state.json").unlink()
    d = _daemon(tmp_path, mosquitto.url)
    try:
        wait_for(
            lambda: d.health()["alert_commands"]["in_alert"], 30, what="in alert from the retained command"
        )
        before = d.capturer.counts()["captured"]
        for seed in (3, 4):  # held-out digits again: the drift clears
            d.agent.predict(_held_out(N, seed))
        wait_for(lambda: not d.health()["alert_commands"]["in_alert"], 60, what="the alert cleared")
        assert d.capturer.rate == 0.0
        d.writer.flush_capture()
        captured = d.capturer.counts()["captured"]
        d.agent.predict(_unlike_digits(5, 5))  # back at sample_rate (0): nothing captured
        d.writer.flush_capture()
        assert d.capturer.counts()["captured"] == captured
        # In alert until the clear arrived: the first window surely captured, the second unless the
        # clear (judged on the first) came in between.
        assert N <= captured - before <= 2 * N
        assert d.capturer.counts()["skipped_hourly_budget"] == 0  # not the budget: the rate
        last, retained = _commands(listener)[-1]
        assert not last.in_alert and last.reason.startswith("drift back to")
        assert json.loads((tmp_path / "state" / "alert_state.json").read_text())["in_alert"] is False
    finally:
        d.stop()
        listener.close()
    assert col.alert_commands.as_dict() == {"sent": 2, "queued_offline": 0, "unsent": 0}


@pytest.mark.timeout(120)
def test_forged_stale_and_malformed_commands_are_refused_counted_and_survived(
    tmp_path: Path, mosquitto: Any
) -> None:
    listener = Listener(mosquitto.port)
    d = _daemon(tmp_path, mosquitto.url)
    base = "http://" + d.api.address
    try:
        wait_for(lambda: d.publisher.connected, 20, what="the agent connected")
        good = encode_alert_command(fleet="lab", device_id="pi-001", in_alert=True, seq=2_000)
        listener.publish(TOPIC, good)
        wait_for(lambda: d.health()["alert_commands"]["in_alert"], 20, what="a valid command applied")
        for payload in (
            encode_alert_command(fleet="lab", device_id="pi-002", in_alert=False, seq=3_000),  # forged
            encode_alert_command(fleet="other", device_id="pi-001", in_alert=False, seq=3_000),  # other fleet
            encode_alert_command(fleet="lab", device_id="pi-001", in_alert=False, seq=1_000),  # stale
            b"\x00\xff not json",
            b'{"schema": 1, "type": "alert_state", "fleet": "lab", "device_id": "pi-001",'
            b' "in_alert": false, "seq": 9999, "why": "extra"}',
            b"{" * 100_000,  # oversized, deeply nested
            b"",
        ):
            listener.publish(TOPIC, payload)
        wait_for(lambda: d.health()["alert_commands"]["refused_total"] >= 7, 20, what="7 refusals")
        h = d.health()["alert_commands"]
        assert h["refused"] == {"foreign": 2, "stale": 1, "malformed": 4}
        assert h["in_alert"] is True and h["seq"] == 2_000 and h["applied"] == 1
        code, js = http(base, "/v1/predict", {"inputs": _unlike_digits(2, 9).tolist()})
        assert code == 200 and len(js["ids"]) == 2  # the daemon serves on
        code, text = http(base, "/metrics")
        assert "edgefleet_agent_alert_commands_refused_total 7" in text
        listener.publish(
            TOPIC, encode_alert_command(fleet="lab", device_id="pi-001", in_alert=False, seq=4_000)
        )
        wait_for(lambda: not d.health()["alert_commands"]["in_alert"], 20, what="a newer command applied")
    finally:
        d.stop()
        listener.close()


@pytest.mark.timeout(90)
def test_a_command_published_while_the_broker_is_down_arrives_after_it_returns(
    tmp_path: Path, mosquitto: Any, collector_factory: Callable[..., Any]
) -> None:
    col = collector_factory(
        f"sqlite:///{tmp_path / 'fleet.db'}", mosquitto.url, fleet="lab", worker_processes=0
    )
    mosquitto.stop()
    wait_for(lambda: not col._connected.is_set(), 20, what="the collector noticing the outage")
    cmd = encode_alert_command(fleet="lab", device_id="pi-001", in_alert=True, seq=5_000)
    col.publish_alert(TOPIC, cmd)
    assert col.alert_commands.as_dict() == {"sent": 1, "queued_offline": 1, "unsent": 0}
    mosquitto.start()
    assert col.wait_ready(30)
    listener = Listener(mosquitto.port)  # subscribes after the reconnect: gets the retained copy
    try:
        wait_for(lambda: _commands(listener), 30, what="the retained command")
        (got, retained), *_ = _commands(listener)
        assert got.seq == 5_000 and got.in_alert and retained
    finally:
        listener.close()
