"""Finding 4: the anti-rollback floor survives a damaged slot, on every activation path.

v3 active, one byte of the active slot changed: the agent falls back to the configured v1 and keeps
serving, but nothing below v3 is installed afterwards: not over the air, not from a local or ssh-style
drop, not through the watched ``bundle`` symlink (live or across a restart). Every refusal is
counted, logged once and shown in /v1/health, /metrics and the retained status.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from device_agent import daemon as daemon_mod
from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.errors import ConfigError
from device_agent.formats.deploy import DeployCommand, HttpSource
from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import VerifyPolicy, load_manifest, manifest_sha256
from device_agent.store import BundleStore, RollbackFloor
from device_agent.update import Updater, UpdaterConfig
from tests.helpers import wait_for
from tests.ota import conftest as ota_fixtures
from tests.ota.agent_proc import damage_active_slot
from tests.ota.harness import Serving
from tests.ota.test_agent_ota import run_cli
from toolchain.shipping.serve import BundleHTTPServer

# the OTA tests' fixtures (signing keys, signed bundles v1, v2, ...), shared rather than copied
base_bundle = ota_fixtures.base_bundle
make_version = ota_fixtures.make_version
ota_keys = ota_fixtures.ota_keys
agents = ota_fixtures.agents
agent_v1 = ota_fixtures.agent_v1


def drop(bundle: Path, state: Path, name: str) -> Path:
    """What ``flash --to ssh://`` does on the device: copy into ``.partial``, then rename."""
    incoming = state / "bundles" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, incoming / (name + ".partial"))
    os.rename(incoming / (name + ".partial"), incoming / name)
    return incoming / name


def update_doc(state: Path) -> dict[str, Any]:
    return json.loads((state / "bundles" / "update.json").read_text())


@pytest.mark.timeout(240)
def test_damaged_slot_fallback_keeps_the_floor_for_flash_and_drops(
    agents, agent_v1, make_version, tmp_path, digits
) -> None:
    state = tmp_path / "state"
    agent = agent_v1()
    cfg = agent.config
    code, out = run_cli("flash", str(make_version(3)), "--to", str(state), "--wait", "60")
    assert code == 0, out
    assert agent.health()["rollback_floor"]["version"] == 3
    agent.stop()
    damage_active_slot(state)

    again = agents(cfg, "after-rot")
    h = again.health()
    assert h["model"]["version"] == 1  # the fallback serves
    assert h["rollback_floor"]["version"] == 3 and h["rollback_floor"]["serving_below_floor"] is True
    assert any(e["event"] == "store_fallback" for e in h["recent_events"])
    x = digits["x_test"][:3].reshape(3, -1).tolist()
    assert len(again.predict(x)["labels"]) == 3

    # edgefleet flash to the local state dir: refused on the host, nothing dropped
    v2 = make_version(2)
    code, out = run_cli("flash", str(v2), "--to", str(state), "--wait", "30")
    assert code == 1 and "anti-rollback floor v3" in out, out
    assert list((state / "bundles" / "incoming").iterdir()) == []

    # the same bundle dropped the way ssh:// does it: the agent refuses it, v1 keeps serving
    d = drop(v2, state, "v2-ssh")
    wait_for(lambda: not d.exists() and update_doc(state).get("state") == "failed", 30, "the drop refused")
    doc = update_doc(state)
    assert doc["new"]["version"] == 2 and "anti-rollback floor v3" in doc["reason"], doc
    h = again.health()
    assert h["model"]["version"] == 1
    assert h["rollback_floor"]["refused_total"] == 1
    assert h["rollback_floor"]["last_refused"]["version"] == 2
    assert h["rollback_floor"]["last_refused"]["source"] == "flash"
    assert any(e["event"] == "deploy_failed" for e in h["recent_events"])
    code, metrics = again.get("/metrics")
    assert "edgefleet_agent_rollback_refused_total 1" in metrics
    assert "edgefleet_agent_rollback_floor_version 3" in metrics
    # a second drop of the same bundle: counted again, logged once
    d = drop(v2, state, "v2-again")
    wait_for(lambda: again.health()["rollback_floor"]["refused_total"] == 2, 30, "the second refusal")
    assert again.log().count("below this device's anti-rollback floor v3") == 1

    # v3 again (the version at the floor) repairs the device
    code, out = run_cli("flash", str(make_version(3)), "--to", str(state), "--wait", "60")
    assert code == 0, out
    h = again.health()
    assert h["model"]["version"] == 3 and h["rollback_floor"]["serving_below_floor"] is False


@pytest.mark.timeout(120)
def test_ota_below_the_floor_is_refused_after_a_fallback(make_version, ota_keys, tmp_path, digits) -> None:
    policy = VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target="x86")
    v1, v2, v3 = make_version(1), make_version(2), make_version(3)
    state = tmp_path / "state"

    def device() -> tuple[Updater, Serving]:
        """Start the way the daemon does: recover, seed the floor, check the slot, pick the bundle."""
        serving = Serving(policy)
        cfg = UpdaterConfig(state, policy=policy, fallback_bundle=v1, health_window_s=0.1, health_poll_s=0.05)
        up = Updater(cfg, switch=serving.switch, emit=serving.emit, on_state=serving.on_state)
        up.recover()
        up.seed_floor()
        up.check_active_slot()
        serve = up.startup_bundle()
        assert serve is not None
        serving.load(serve)
        up.report_pending()
        if serving.version is not None and not up.floor.serving_below_floor:
            m = serving.predictor.manifest
            from device_agent.formats.files import BundleId

            up.floor.raise_to(BundleId(m.name, m.version, manifest_sha256(serve)), fallback=serve == v1)
        return up, serving

    def command(bundle: Path, url: str, dep: str) -> DeployCommand:
        m = load_manifest(bundle)
        size = sum(f.size_bytes for f in m.files)
        return DeployCommand(dep, m.name, m.version, manifest_sha256(bundle), size, HttpSource(url))

    up, serving = device()
    srv = BundleHTTPServer(v3)
    srv.start_background()
    try:
        assert up.deploy(command(v3, srv.url(), "d-3")) is True
    finally:
        srv.shutdown()
        srv.server_close()
    assert serving.version == 3 and up.floor.version == 3
    damage_active_slot(state)

    up, serving = device()  # the restart after the SD card rotted
    assert serving.version == 1 and up.store.active() is None
    assert any(e[0] == "store_fallback" for e in serving.events)
    srv = BundleHTTPServer(v2)
    srv.start_background()
    try:
        assert up.deploy(command(v2, srv.url(), "d-2")) is False
    finally:
        srv.shutdown()
        srv.server_close()
    ev = serving.events[-1]
    assert ev[0] == "deploy_failed" and "anti-rollback floor v3" in ev[2]["reason"], ev
    assert ev[2]["state"] == "downloading"  # refused before any byte was fetched
    assert serving.version == 1 and up.store.active() is None
    assert up.floor.refused_total == 1 and up.floor.status()["last_refused"]["source"] == "ota"
    assert list(up.store.staging_dir.iterdir()) == []
    scores = serving.predict_ok(digits["x_test"][:10].reshape(10, -1))
    assert scores.shape == (10, 10)
    # the floor is on disk, fsynced: a fresh reader sees it
    assert RollbackFloor(state / "bundles").version == 3


def daemon_config(path: Path, bundle: Path, state: Path, pub: Path) -> Path:
    path.write_text(
        f'[agent]\ndevice_id = "pi-1"\nfleet = "lab"\nbundle = "{bundle}"\nstate_dir = "{state}"\n'
        f'target = "x86"\ntrusted_keys = ["{pub}"]\n[api]\nlisten = "off"\n'
    )
    return path


@pytest.mark.timeout(120)
def test_bundle_symlink_flip_to_an_older_bundle_is_refused(
    make_version, ota_keys, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(daemon_mod, "BUNDLE_POLL_S", 0.1)
    v2, v3, v4 = make_version(2), make_version(3), make_version(4)
    link = tmp_path / "current"
    link.symlink_to(v3)
    state = tmp_path / "state"
    cfg = daemon_config(tmp_path / "agent.toml", link, state, ota_keys["pub"])
    d = Daemon(load_config(cfg)).start()
    events: list[dict[str, Any]] = []
    d.add_event_listener(lambda raw: events.append(json.loads(raw)))
    try:
        assert d.agent.model.ref.version == 3 and d.floor.version == 3

        def flip(to: Path) -> None:
            tmp = tmp_path / "current.new"
            tmp.symlink_to(to)
            os.replace(tmp, link)

        with caplog.at_level(logging.WARNING):
            flip(v2)
            wait_for(lambda: d.floor.refused_total == 1, 20, "the flip to v2 refused")
        assert d.agent.model.ref.version == 3  # still serving
        assert d.reloads_failed == 1
        assert events[-1]["event"] == "reload_failed" and "anti-rollback floor v3" in events[-1]["message"]
        h = d.health()
        assert h["rollback_floor"]["refused_total"] == 1
        assert h["rollback_floor"]["last_refused"]["source"] == "bundle path"
        status = json.loads(d.status_payload("online"))
        assert status["deployment"]["rollback_refused"] == 1 and status["deployment"]["rollback_floor"] == 3
        assert sum("anti-rollback floor v3" in r.getMessage() for r in caplog.records) == 1
        # SIGHUP (reload) of the same path refuses it too
        assert d.reload() is False and d.floor.refused_total == 2
        # a newer bundle goes through and raises the floor
        flip(v4)
        # the model_loaded event follows the floor's rise (the model itself is swapped just before it)
        wait_for(
            lambda: any(e["event"] == "model_loaded" and e["message"].endswith(" v4") for e in events),
            20,
            "the flip to v4",
        )
        assert d.agent.model.ref.version == 4
        assert d.floor.version == 4 and RollbackFloor(state / "bundles").version == 4
        flip(v3)
        wait_for(lambda: d.floor.refused_total == 3, 20, "the flip back to v3 refused")
        assert d.agent.model.ref.version == 4
    finally:
        d.stop()
    # a restart does not activate the older bundle the link now names: it is not the fallback
    with pytest.raises(ConfigError, match="anti-rollback floor v4"):
        Daemon(load_config(cfg))


def test_floor_file_is_atomic_and_only_rises(tmp_path: Path) -> None:
    from device_agent.formats.files import BundleId

    f = RollbackFloor(tmp_path)
    assert f.version == 0 and not f.exists
    a, b = BundleId("m", 3, "a" * 64), BundleId("m", 2, "b" * 64)
    assert f.raise_to(a) is True
    assert f.raise_to(b) is False and f.version == 3
    assert RollbackFloor(tmp_path).version == 3
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    # a damaged floor file does not unlock rollbacks: the updater rebuilds it from the store's pointer
    store = BundleStore(tmp_path / "state")
    store.ensure()
    store.set_active(None)
    (store.root / "active.json").write_text(
        json.dumps({"schema": 1, "slot": "a", "name": "m", "version": 5, "sha256": "c" * 64})
    )
    (store.root / "floor.json").write_bytes(b"{garbage")
    up = Updater(UpdaterConfig(tmp_path / "state"), switch=lambda p: True)
    up.seed_floor()
    up.check_active_slot()  # the slot folder is missing: falls back, but the pointer said v5
    assert up.floor.version == 5 and RollbackFloor(store.root).version == 5


@pytest.mark.timeout(60)
def test_stale_partial_drops_are_removed_when_the_agent_starts(
    make_version, ota_keys, tmp_path, caplog
) -> None:
    """Finding 7 (agent part): a flash killed mid-copy left ``incoming/<drop>.partial`` behind for good."""
    state = tmp_path / "state"
    incoming = state / "bundles" / "incoming"
    dead = incoming / "digits-v2-abc.partial"
    shutil.copytree(make_version(2), dead)
    old = 1_000_000_000.0
    for root, dirs, files in os.walk(dead):
        for n in dirs + files:
            os.utime(os.path.join(root, n), (old, old))
    os.utime(dead, (old, old))
    live = incoming / "digits-v3-def.partial"  # a copy still in progress: recent files
    shutil.copytree(make_version(3), live)
    cfg = daemon_config(tmp_path / "agent.toml", make_version(1), state, ota_keys["pub"])
    with caplog.at_level(logging.WARNING):
        d = Daemon(load_config(cfg))
    try:
        assert not dead.exists() and live.is_dir()
        assert d.health()["store"]["stale_partials_removed"] == 1
        lines = [r.getMessage() for r in caplog.records if "stale .partial" in r.getMessage()]
        assert len(lines) == 1 and "digits-v2-abc.partial" in lines[0]
    finally:
        d.stop()
