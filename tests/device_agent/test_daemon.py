"""The daemon as a process: kill -9 before PUBACK loses nothing, SIGTERM flushes + says offline, Last Will."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.device_agent.agent_bundles import cached_onnx_bundle, digits
from tests.device_agent.agent_helpers import AgentProcess, Collector, http, persist, wait_for, write_config

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return digits()["x_test"]


@pytest.mark.timeout(120)
def test_sigkill_between_close_and_ack_window_arrives_after_restart(
    tmp_path: Path, mosquitto, x_test
) -> None:
    persist(mosquitto)
    col = Collector(mosquitto.port, persistent=True)
    mosquitto.stop()  # windows close but cannot be acknowledged
    cfg = write_config(
        tmp_path / "agent.toml",
        bundle=cached_onnx_bundle(),
        state_dir=tmp_path / "state",
        url=mosquitto.url,
        window_max_samples=2,
    )
    agent = AgentProcess(cfg, tmp_path / "agent1.log")
    try:
        base = agent.api_base()
        for i in range(3):
            assert http(base, "/v1/predict", {"inputs": x_test[i * 2 : i * 2 + 2].tolist()})[0] == 200
        wait_for(lambda: http(base, "/v1/health")[1]["outbox"]["rows"] == 3, what="3 windows in the outbox")
    finally:
        agent.kill()  # SIGKILL: no flush, no goodbye
    assert agent.proc.returncode == -signal.SIGKILL
    mosquitto.start()
    agent = AgentProcess(cfg, tmp_path / "agent2.log")
    try:
        base = agent.api_base()
        wait_for(lambda: set(col.seqs()) >= {1, 2, 3}, what="the unacknowledged windows after restart")
        http(base, "/v1/predict", {"inputs": x_test[10:12].tolist()})
        wait_for(lambda: 4 in col.seqs(), what="a new window")
        assert list(dict.fromkeys(col.seqs()))[:4] == [1, 2, 3, 4]  # seq persisted, order kept
        counts = {m["seq"]: m["count"] for m in col.stats()}
        assert [counts[s] for s in (1, 2, 3, 4)] == [2, 2, 2, 2]
    finally:
        agent.kill()
        col.close()


@pytest.mark.timeout(120)
def test_sigterm_flushes_the_open_window_and_publishes_offline(tmp_path: Path, mosquitto, x_test) -> None:
    col = Collector(mosquitto.port)
    cfg = write_config(
        tmp_path / "agent.toml",
        bundle=cached_onnx_bundle(),
        state_dir=tmp_path / "state",
        url=mosquitto.url,
        window_s=3600,
        window_max_samples=1000,
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        base = agent.api_base()
        wait_for(lambda: http(base, "/v1/health")[1]["mqtt"]["connected"], what="connection")
        http(base, "/v1/predict", {"inputs": x_test[:3].tolist()})
        assert col.seqs() == []  # the hour-long window is still open
        agent.signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        agent.kill()
    wait_for(lambda: col.seqs(), what="the flushed window")
    assert [m["count"] for m in col.stats()] == [3]
    statuses = col.statuses()
    assert statuses[0]["state"] == "online" and statuses[-1]["state"] == "offline"
    # the offline status is retained: a late subscriber sees it
    late = Collector(mosquitto.port)
    try:
        wait_for(lambda: late.of_kind("status"), what="retained status")
        topic, payload, retained = late.of_kind("status")[0]
        assert retained and json.loads(payload)["state"] == "offline"
    finally:
        late.close()
        col.close()


@pytest.mark.timeout(120)
def test_last_will_says_offline_when_the_agent_dies(tmp_path: Path, mosquitto, x_test) -> None:
    col = Collector(mosquitto.port)
    cfg = write_config(
        tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state", url=mosquitto.url
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        base = agent.api_base()
        wait_for(lambda: http(base, "/v1/health")[1]["mqtt"]["connected"], what="connection")
        wait_for(lambda: col.statuses(), what="birth message")
        birth = col.statuses()[0]
        assert birth["state"] == "online" and birth["model"]["name"] == "digits-dense"
        assert birth["agent_version"] and birth["model"]["sha256"]
    finally:
        agent.kill()
    wait_for(lambda: col.statuses()[-1]["state"] == "offline", what="the Last Will")
    col.close()
