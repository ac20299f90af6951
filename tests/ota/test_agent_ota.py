"""Over-the-air updates against the real agent process and a real Mosquitto broker.

Also: a local-path flash activating in a running agent, and SIGKILL of the agent at every point of an
update followed by a restart, which must serve the old or the new model, never anything in between.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.formats.deploy import bundle_topic
from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import VerifyPolicy, manifest_sha256, verify_bundle
from device_agent.store import BundleStore
from tests.ota.agent_proc import damage_active_slot, wait_for, write_agent_config
from toolchain.cli import main
from toolchain.shipping.serve import BundleHTTPServer


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def flash_mqtt(port: int, bundle: str, *args: str) -> tuple[int, str]:
    """``edgefleet flash BUNDLE --to mqtt://127.0.0.1:PORT/lab/pi-001 ARGS``."""
    return run_cli("flash", bundle, "--to", f"mqtt://127.0.0.1:{port}/lab/pi-001", *args)


class Watch:
    """Every message under edgefleet/# on the broker (payloads kept as bytes)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe("edgefleet/#", qos=1)
        self.client.on_message = self._on
        self.client.connect("127.0.0.1", port, 10)
        self.client.loop_start()
        assert ready.wait(10)

    def _on(self, c: Any, u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            docs = [json.loads(p) for t, p, _ in self.messages if t.endswith("/events") and p]
        return [d for d in docs if name is None or d["event"] == name]

    def last_status(self, device: str) -> dict[str, Any] | None:
        with self.lock:
            st = [json.loads(p) for t, p, _ in self.messages if t.endswith(f"/{device}/status") and p]
        return st[-1] if st else None

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def watch(mosquitto) -> Iterator[Watch]:
    w = Watch(mosquitto.port)
    yield w
    w.close()


@pytest.fixture
def server() -> Iterator[Callable[[Path], str]]:
    servers: list[BundleHTTPServer] = []

    def serve(bundle: Path) -> str:
        s = BundleHTTPServer(bundle)
        s.start_background()
        servers.append(s)
        return s.url()

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def x_rows(digits: dict[str, np.ndarray], n: int = 3) -> list[Any]:
    return digits["x_test"][:n].reshape(n, -1).tolist()


# ------------------------------------------------------------------------------------------------ over the air


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_ota_over_mosquitto_from_edgefleet_serve(
    mosquitto, watch, agent_v1, server, make_version, ota_keys, digits
) -> None:
    agent = agent_v1(mosquitto.url)
    wait_for(lambda: watch.last_status("pi-001"), what="the agent's birth status")
    v2 = make_version(2)
    url = server(v2)
    code, out = flash_mqtt(
        mosquitto.port, str(v2), "--url", url, "--key", str(ota_keys["pub"]), "--wait", "90"
    )
    assert code == 0 and "now serves digits v2" in out, out + agent.log()[-2000:]
    health = agent.health()
    assert health["model"]["version"] == 2 and health["model"]["sha256"] == manifest_sha256(v2)
    assert health["deployment"]["state"] == "committed"
    assert agent.predict(x_rows(digits))["model"]["version"] == 2
    ev = watch.events("deployed")[-1]
    assert ev["detail"]["version"] == 2 and ev["detail"]["previous_version"] == 1

    def status_shows_v2() -> bool:
        st = watch.last_status("pi-001")
        return bool(
            st and st["model"]["version"] == 2 and (st["deployment"] or {}).get("state") == "committed"
        )

    wait_for(status_shows_v2, what="the retained status to show v2 and the committed deployment")


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_ota_with_chunks_over_mqtt(mosquitto, watch, agent_v1, make_version, digits) -> None:
    agent = agent_v1(mosquitto.url)
    wait_for(lambda: watch.last_status("pi-001"), what="the agent's birth status")
    v2 = make_version(2)
    code, out = flash_mqtt(mosquitto.port, str(v2), "--chunk-bytes", "1024", "--wait", "90")
    assert code == 0 and "now serves digits v2" in out, out + agent.log()[-2000:]
    assert agent.model_version() == 2
    assert agent.predict(x_rows(digits))["model"]["sha256"] == manifest_sha256(v2)
    # the host removed its retained chunks: a fresh subscriber gets nothing under the bundle topic.
    # Retained messages are sent when the subscription is made, so they would arrive before a probe
    # message published afterwards on a topic the same client subscribed to.
    late = Watch(mosquitto.port)
    try:
        late.client.subscribe(bundle_topic("lab", manifest_sha256(v2)) + "/+", qos=1)
        late.publish("edgefleet/lab/probe/cmd", b"probe")
        wait_for(lambda: any(t == "edgefleet/lab/probe/cmd" for t, _, _ in late.messages), what="the probe")
        with late.lock:
            assert not [t for t, p, r in late.messages if "/bundles/" in t and p]
    finally:
        late.close()


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_bad_commands_and_bundles_over_the_air_never_stop_the_agent(
    mosquitto, watch, agent_v1, server, make_version, digits
) -> None:
    agent = agent_v1(mosquitto.url)
    wait_for(lambda: watch.last_status("pi-001"), what="birth status")
    for junk in (
        b"not json",
        b'{"schema": 1, "type": "deploy"}',
        b'{"schema": 1, "type": "reboot"}',
        b"\xff" * 10,
    ):
        watch.publish("edgefleet/lab/pi-001/cmd", junk)
    wait_for(lambda: len(watch.events("command_rejected")) >= 4, what="4 command_rejected events")
    assert agent.model_version() == 1
    # a bundle signed by another key, over the air: refused with the reason, v1 keeps serving
    bad = make_version(2, key="other_key")
    code, out = flash_mqtt(mosquitto.port, str(bad), "--url", server(bad), "--wait", "90")
    assert code == 1 and "does not verify with any trusted key" in out, out
    assert agent.model_version() == 1
    ev = watch.events("deploy_failed")[-1]
    assert "does not verify" in ev["detail"]["reason"]
    assert agent.predict(x_rows(digits))["model"]["version"] == 1
    # the fleet-wide topic with a device filter that excludes this device: ignored
    from device_agent.formats.deploy import DeployCommand, HttpSource

    good = make_version(2)
    m_sha = manifest_sha256(good)
    size = sum(p.stat().st_size for p in good.iterdir() if p.name not in ("manifest.json", "manifest.sig"))
    other = DeployCommand("d-other", "digits", 2, m_sha, size, HttpSource(server(good)), ("pi-999",))
    watch.publish("edgefleet/lab/cmd", other.encode())
    mine = DeployCommand("d-mine", "digits", 2, m_sha, size, HttpSource(server(good)), ("pi-001",))
    watch.publish("edgefleet/lab/cmd", mine.encode())
    wait_for(
        lambda: [e for e in watch.events("deployed") if e["detail"]["deployment_id"] == "d-mine"],
        90,
        "the fleet-wide deployment",
    )
    assert not [e for e in watch.events() if e["detail"].get("deployment_id") == "d-other"]
    assert agent.model_version() == 2


# ------------------------------------------------------------------------------------------------ local flash


@pytest.mark.timeout(120)
def test_local_flash_is_activated_by_the_running_agent(
    agents, agent_v1, make_version, tmp_path, digits
) -> None:
    state = tmp_path / "state"
    agent = agent_v1()
    cfg = agent.config
    v2 = make_version(2)
    code, out = run_cli("flash", str(v2), "--to", str(state))
    assert code == 0, out
    wait_for(lambda: agent.model_version() == 2, 30, "the agent to serve v2 after a local flash")
    assert agent.predict(x_rows(digits))["model"]["sha256"] == manifest_sha256(v2)
    # and the new model survives a restart of the agent
    agent.stop()
    again = agents(cfg, "restart")
    assert again.model_version() == 2


@pytest.mark.timeout(120)
def test_damaged_active_slot_falls_back_to_the_configured_bundle(
    agents, agent_v1, make_version, tmp_path
) -> None:
    state = tmp_path / "state"
    agent = agent_v1()
    cfg = agent.config
    code, out = run_cli("flash", str(make_version(2)), "--to", str(state), "--wait", "60")
    assert code == 0, out
    agent.stop()
    damage_active_slot(state)  # the SD card rotted
    again = agents(cfg, "after-rot")
    assert again.model_version() == 1
    assert BundleStore(state).active() is None
    assert any(e["event"] == "store_fallback" for e in again.health()["recent_events"])
    code, out = run_cli("flash", str(make_version(2)), "--to", str(state), "--wait", "60")
    assert code == 0 and "now serves digits v2" in out, out  # and it can be repaired by flashing again


# ------------------------------------------------------------------------------------------------ SIGKILL in every state


PAUSE_POINTS = {
    # pause point -> version served after SIGKILL + restart
    "state:downloading": 1,
    "state:verifying": 1,
    "state:writing": 1,
    "mid-copy": 1,
    "state:switching": 1,
    "pointer-moved": 1,
    "state:checking": 1,  # never passed its health window: rolled back
    "state:committed": 2,
}


@pytest.mark.broker
@pytest.mark.timeout(240)
@pytest.mark.parametrize("pause_at", list(PAUSE_POINTS))
def test_sigkill_in_every_update_state_leaves_old_or_new_model_serving(
    pause_at: str, mosquitto, watch, agents, server, make_version, ota_keys, tmp_path, digits
) -> None:
    v1, v2 = make_version(1), make_version(2)
    state = tmp_path / "state"
    cfg = write_agent_config(
        tmp_path / "agent.toml", bundle=v1, state_dir=state, pub=ota_keys["pub"], mqtt_url=mosquitto.url
    )
    agent = agents(cfg, "paused", pause_at=pause_at)
    assert agent.model_version() == 1
    wait_for(lambda: watch.last_status("pi-001"), what="birth status")
    code, out = flash_mqtt(mosquitto.port, str(v2), "--url", server(v2))
    assert code == 0, out
    agent.wait_paused()
    agent.sigkill()

    restarted = agents(cfg, "restarted")
    want = PAUSE_POINTS[pause_at]
    health = restarted.health()
    assert health["model"]["version"] == want, (pause_at, health, restarted.log()[-2000:])
    served = Path(health["model"]["path"])
    pol = VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target="x86")
    assert verify_bundle(served, pol).version == want  # a complete, verified bundle: nothing in between
    assert restarted.predict(x_rows(digits))["model"]["version"] == want
    store = BundleStore(state)
    assert list(store.staging_dir.iterdir()) == []
    assert not [p for p in store.slots_dir.iterdir() if p.name.endswith(".partial")]
    expected_event = "deployed" if want == 2 else "deploy_failed"
    wait_for(lambda: watch.events(expected_event), 30, f"the {expected_event} event after the restart")
    assert restarted.health()["deployment"]["state"] == ("committed" if want == 2 else "failed")
    if want == 1:
        reason = watch.events("deploy_failed")[-1]["detail"]["reason"]
        assert "restarted" in reason
        # the device is not stuck: the same bundle deploys fine afterwards
        code, out = flash_mqtt(mosquitto.port, str(v2), "--url", server(v2), "--wait", "120")
        assert code == 0 and "now serves digits v2" in out, out + restarted.log()[-2000:]
