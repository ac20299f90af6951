"""Finding 1 end to end: a device that loses its state keeps its next windows.

The real agent daemon (ONNX bundle, disk outbox, MQTT publisher), a real Mosquitto, the collector and
a real SQLite database. The device's state directory is wiped between two runs, as a reflash or a
factory reset does: its seq starts at 1 again. Before stream ids, the collector dropped every new
window as a duplicate of the old ones (18 windows and 537 predictions lost in the report).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import device_agent.daemon as daemon_mod
import device_agent.mqtt as mqtt_mod
from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.outbox import Outbox
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits
from tests.device_agent.agent_helpers import write_config
from tests.helpers import wait_for
from toolchain.fleet.collector import Collector
from toolchain.fleet.registry import register_bundle
from toolchain.fleet.status import status_rows
from toolchain.fleet.storage import open_store

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def fast_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_mod, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(mqtt_mod, "RECONNECT_MAX_S", 0.5)
    monkeypatch.setattr(daemon_mod, "SHUTDOWN_FLUSH_S", 5.0)


def run_device(cfg: Path, batches: list[int], x: np.ndarray, per_window: int) -> tuple[int, int, str]:
    """Run the agent, predict ``batches``, stop; return (windows and predictions acknowledged, stream).

    A window closes every ``per_window`` predictions; the one open at stop is flushed by ``stop()``.
    """
    d = Daemon(load_config(cfg)).start()
    try:
        at = 0
        for n in batches:
            d.agent.predict(x[np.arange(at, at + n) % len(x)])
            at += n
        full = sum(batches) // per_window
        wait_for(lambda: d.windows_written >= full, what=f"{full} windows written to the outbox")
        wait_for(lambda: d.outbox.depth()[0] == 0, 60, "outbox drained (every window acknowledged)")
        stream = d.outbox.stream
    finally:
        d.stop()
    left = Outbox(load_config(cfg).outbox_path)  # what stop() could not deliver stays here
    try:
        assert left.depth()[0] == 0, "the window flushed at stop was not acknowledged"
    finally:
        left.close()
    return d.windows_written, sum(batches), stream


def stored(url: str) -> tuple[int, int]:
    with open_store(url, migrate=False) as s:
        n, preds = s.query("SELECT COUNT(*), COALESCE(SUM(count), 0) FROM windows")[0]
    return int(n), int(preds)


def test_wiped_state_dir_seq_restarts_and_every_new_window_is_stored(tmp_path: Path, mosquitto) -> None:
    bundle = cached_onnx_bundle()
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    register_bundle(url, bundle)
    x = digits()["x_test"]
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path / "agent.toml", bundle=bundle, state_dir=state, url=mosquitto.url, window_max_samples=30
    )
    col = Collector(url, mosquitto.url, client_id="stream-e2e", worker_processes=0).start()
    try:
        assert col.wait_ready(15)
        # First life: 20 windows of 30 predictions (seq 1..20).
        w1, p1, s1 = run_device(cfg, [30] * 20, x, 30)
        wait_for(lambda: stored(url)[0] >= w1, 60, f"{w1} windows of the first life stored")
        # Reflash: the state directory (outbox, seq) is gone.
        shutil.rmtree(state)
        # Second life: 18 windows, 537 predictions (as in the report), seq from 1 again.
        batches = [30] * 17 + [27]
        w2, p2, s2 = run_device(cfg, batches, x[100:], 30)
        assert s2 != s1
        wait_for(lambda: stored(url)[0] >= w1 + w2, 60, f"{w1 + w2} windows stored")
        with open_store(url, migrate=False) as s:
            seqs = [r[0] for r in s.query("SELECT seq FROM windows WHERE stream = ? ORDER BY seq", (s2,))]
        assert seqs[:18] == list(range(1, 19))  # the new life's seq restarted at 1 and is all there
        assert stored(url) == (w1 + w2, p1 + p2)  # every window and prediction of both lives
        (row,) = status_rows(url)
        assert row["stream_changes"] == 1 and row["stream"] == s2
        assert row["windows"] == w1 + w2 and row["predictions"] == p1 + p2 == 600 + 537
        assert col.counters.stream_changes == 1
    finally:
        col.stop()
