"""Hot reload: switch_bundle (the one way to change models), SIGHUP, and a change of the bundle path."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

import device_agent.daemon as daemon_mod
from device_agent.config import load_config
from device_agent.daemon import Daemon
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits, onnx_bundle
from tests.device_agent.agent_helpers import AgentProcess, Collector, http, wait_for, write_config


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return digits()["x_test"]


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_bundle(tmp_path_factory.mktemp("v2") / "bundle", version=2, shift=0.01)


def tampered(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "baseline.json").write_text((dst / "baseline.json").read_text().replace('"source"', '"sourcf"'))
    return dst


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_switch_bundle_events_status_and_a_refused_bundle(
    tmp_path: Path, mosquitto, v2: Path, x_test
) -> None:
    col = Collector(mosquitto.port)
    cfg = write_config(
        tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state", url=mosquitto.url
    )
    d = Daemon(load_config(cfg)).start()
    try:
        wait_for(lambda: d.publisher.connected, what="connection")
        d.agent.predict(x_test[:4])
        assert d.switch_bundle(v2) is True
        assert d.agent.model.ref.version == 2
        assert d.agent.predict(x_test[:1]).model.version == 2
        wait_for(lambda: any(s["model"]["version"] == 2 for s in col.statuses()), what="status with v2")
        wait_for(
            lambda: len([e for e in col.events() if e["event"] == "model_loaded"]) >= 2, what="model_loaded"
        )
        loaded = [e for e in col.events() if e["event"] == "model_loaded"][-1]
        assert loaded["detail"]["version"] == 2 and loaded["detail"]["runtime"] == "onnxruntime"
        # the window of the old model closed at the switch and was sent with the old model's identity
        wait_for(lambda: any(m["count"] == 4 for m in col.stats()), what="the old model's window")
        assert [m for m in col.stats() if m["count"] == 4][0]["model"]["version"] == 1

        bad = tampered(v2, tmp_path / "bad")
        assert d.switch_bundle(bad) is False
        assert d.agent.model.ref.version == 2  # still serving
        wait_for(lambda: any(e["event"] == "reload_failed" for e in col.events()), what="reload_failed")
        failed = [e for e in col.events() if e["event"] == "reload_failed"][0]
        assert "baseline.json" in failed["message"] and "sha256" in failed["message"]
        assert failed["detail"]["serving_version"] == 2
        assert d.health()["reloads_failed"] == 1
        assert d.switch_bundle(tmp_path / "missing") is False
    finally:
        d.stop()
        col.close()


@pytest.mark.timeout(90)
def test_bundle_path_change_reloads(
    tmp_path: Path, v2: Path, monkeypatch: pytest.MonkeyPatch, x_test
) -> None:
    """``[agent] bundle`` is a symlink that an updater flips: the agent notices and switches."""
    monkeypatch.setattr(daemon_mod, "BUNDLE_POLL_S", 0.1)
    link = tmp_path / "current"
    link.symlink_to(cached_onnx_bundle())
    cfg = write_config(tmp_path / "agent.toml", bundle=link, state_dir=tmp_path / "state")
    d = Daemon(load_config(cfg)).start()
    try:
        assert d.agent.model.ref.version == 1
        tmp_link = tmp_path / "current.new"
        tmp_link.symlink_to(v2)
        os.replace(tmp_link, link)  # atomic flip
        wait_for(lambda: d.agent.model.ref.version == 2, what="reload after the path change")
        bad = tampered(v2, tmp_path / "bad")
        tmp_link.symlink_to(bad)
        os.replace(tmp_link, link)
        wait_for(lambda: d.reloads_failed == 1, what="the refused bundle")
        assert d.agent.model.ref.version == 2
        assert d.agent.predict(x_test[:2]).model.version == 2
    finally:
        d.stop()


@pytest.mark.timeout(120)
def test_sighup_rereads_the_config_and_switches(tmp_path: Path, v2: Path, x_test) -> None:
    cfg = write_config(tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        base = agent.api_base()
        assert http(base, "/v1/health")[1]["model"]["version"] == 1
        cfg.write_text(cfg.read_text().replace(str(cached_onnx_bundle()), str(v2)))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: http(base, "/v1/health")[1]["model"]["version"] == 2, what="v2 after SIGHUP")
        code, out = http(base, "/v1/predict", {"inputs": x_test[:1].tolist()})
        assert code == 200 and out["model"]["version"] == 2
        # a config broken on disk: SIGHUP keeps the running model and config
        cfg.write_text(cfg.read_text() + "\n[bogus]\n")
        agent.signal(signal.SIGHUP)
        wait_for(
            lambda: "config" in str(http(base, "/v1/health")[1]["recent_events"]), what="reload_failed event"
        )
        health = http(base, "/v1/health")[1]
        assert health["model"]["version"] == 2 and health["recent_events"][-1]["event"] == "reload_failed"
        agent.signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        agent.kill()


def test_signal_handlers_are_in_place_before_the_api_listens(tmp_path: Path, monkeypatch) -> None:
    """A SIGHUP sent as soon as /v1/health answers must reach the handler (not kill the agent)."""
    cfg = write_config(tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state")
    seen: dict[str, object] = {}

    def start(self: Daemon) -> Daemon:
        seen["hup"] = signal.getsignal(signal.SIGHUP)
        seen["term"] = signal.getsignal(signal.SIGTERM)
        self._stopping.set()
        return self

    monkeypatch.setattr(Daemon, "start", start)
    monkeypatch.setattr(Daemon, "stop", lambda self: None)
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        assert Daemon(load_config(cfg)).run_forever() == 0
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    for name in ("hup", "term"):
        assert callable(seen[name]) and seen[name] not in (signal.SIG_DFL, signal.SIG_IGN), name
