"""Telemetry over a real Mosquitto (and the embedded amqtt broker): seq, outages, outbox bounds, errors."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.formats.telemetry import decode_stats, decode_status
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits
from tests.device_agent.agent_helpers import (
    Collector,
    http,
    make_tls,
    persist,
    reconfigure,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("fast_reconnect")]


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return digits()["x_test"]


def start_daemon(tmp_path: Path, url: str | None, **kw: object) -> Daemon:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = write_config(
        tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state", url=url, **kw
    )  # type: ignore[arg-type]
    return Daemon(load_config(cfg)).start()


def base(d: Daemon) -> str:
    assert d.api is not None
    return "http://" + d.api.address


@pytest.mark.timeout(60)
def test_windows_arrive_with_consecutive_seq_and_decode(
    tmp_path: Path, mosquitto, x_test: np.ndarray
) -> None:
    col = Collector(mosquitto.port)
    d = start_daemon(tmp_path, mosquitto.url, window_max_samples=10)
    try:
        for i in range(5):
            d.agent.predict(x_test[i * 10 : (i + 1) * 10])
        wait_for(lambda: len(col.seqs()) >= 5, what="5 windows")
        seqs = col.seqs()
        assert seqs[:5] == list(range(seqs[0], seqs[0] + 5))
        msg = decode_stats(col.of_kind("stats")[0][1], topic_device="pi-001", topic_fleet="lab")
        prof = msg.profile(d.agent.model.spec)  # histograms fit the bundle's baseline exactly
        assert prof.count == 10 and msg.model == d.agent.model.ref
        assert len(col.of_kind("stats")[0][1]) < 8 * 1024
        status = decode_status(col.of_kind("status")[0][1])
        assert status.state == "online" and status.model == d.agent.model.ref
        assert col.of_kind("status")[0][0] == "edgefleet/lab/pi-001/status"
        wait_for(lambda: d.outbox.depth()[0] == 0, what="outbox drained after PUBACKs")
        assert d.publisher.health()["protocol"] == "MQTT 5"  # Mosquitto speaks it
    finally:
        d.stop()
        col.close()
    # the clean stop publishes "offline" (retained)
    assert json.loads(col.of_kind("status")[-1][1])["state"] == "offline"


@pytest.mark.timeout(90)
def test_broker_outage_every_window_exactly_once_in_order(
    tmp_path: Path, mosquitto, x_test: np.ndarray
) -> None:
    persist(mosquitto)
    col = Collector(mosquitto.port, persistent=True)
    d = start_daemon(tmp_path, mosquitto.url, window_max_samples=5)
    try:
        d.agent.predict(x_test[:5])
        d.agent.predict(x_test[5:10])
        wait_for(lambda: len(col.seqs()) >= 2, what="windows before the outage")
        mosquitto.stop()
        wait_for(lambda: not d.publisher.connected, what="agent noticing the outage")
        for i in range(6):  # inference keeps working while the broker is down
            d.agent.predict(x_test[10 + i * 5 : 15 + i * 5])
        wait_for(lambda: d.outbox.depth()[0] >= 6, what="windows queued in the outbox")
        assert http(base(d), "/v1/health")[1]["mqtt"]["connected"] is False
        mosquitto.start()
        wait_for(lambda: d.outbox.depth()[0] == 0, what="outbox drained after the broker came back")
        d.agent.predict(x_test[100:105])
        wait_for(lambda: col.seqs() and col.seqs()[-1] >= 9, what="last window at the collector")
    finally:
        d.stop()
        col.close()
    seqs = col.seqs()
    first_seen = list(dict.fromkeys(seqs))  # a consumer stores each seq once
    assert first_seen[:9] == list(range(1, 10))  # every window, in order (10: the window closed at stop)


@pytest.mark.timeout(60)
def test_outbox_full_drops_oldest_and_reports_count(tmp_path: Path, mosquitto, x_test: np.ndarray) -> None:
    persist(mosquitto)
    col = Collector(mosquitto.port, persistent=True)
    mosquitto.stop()
    d = start_daemon(tmp_path, mosquitto.url, window_max_samples=1, outbox_max_rows=3)
    try:
        for i in range(8):
            d.agent.predict(x_test[i])
        wait_for(lambda: d.windows_written == 8, what="8 windows stored")
        assert d.outbox.depth()[0] == 3 and d.outbox.dropped_total == 5
        mosquitto.start()
        wait_for(lambda: d.outbox.depth()[0] == 0, what="outbox drained")
        d.agent.predict(x_test[9])
        wait_for(lambda: 9 in col.seqs(), what="the next window")
        got = {m["seq"]: m for m in col.stats()}
        assert sorted(got) == [6, 7, 8, 9]  # 1-5 dropped (oldest first)
        # each drop is reported once, by the next stored window; a dropped window's own report moves on
        assert [got[s]["dropped_windows"] for s in (6, 7, 8, 9)] == [1, 1, 1, 2]
        assert sum(m["dropped_windows"] for m in got.values()) == 5
        metrics = http(base(d), "/metrics")[1]
        assert "edgefleet_agent_dropped_windows_total 5" in metrics
    finally:
        d.stop()
        col.close()


@pytest.mark.timeout(60)
def test_wrong_password_inference_keeps_working_and_health_shows_error(
    tmp_path: Path, mosquitto, x_test, caplog: pytest.LogCaptureFixture
) -> None:
    if not Path("/usr/bin/mosquitto_passwd").exists():
        pytest.skip("mosquitto_passwd not installed")
    pw = tmp_path / "passwd"
    pw.write_text("")
    subprocess.run(["/usr/bin/mosquitto_passwd", "-b", str(pw), "agent", "right"], check=True)
    reconfigure(mosquitto, f"password_file {pw}\n", drop="allow_anonymous true")
    (tmp_path / "secret").write_text("wrong\n")
    d = start_daemon(
        tmp_path,
        mosquitto.url,
        window_max_samples=2,
        extra_mqtt=f'username = "agent"\npassword_file = "{tmp_path / "secret"}"',
    )
    try:
        code, out = http(base(d), "/v1/predict", {"inputs": x_test[:3].tolist()})
        assert code == 200 and len(out["labels"]) == 3
        health = wait_for(
            lambda: (h := http(base(d), "/v1/health")[1])["mqtt"]["last_error"] and h, what="error"
        )
        assert health["mqtt"]["connected"] is False
        err = health["mqtt"]["last_error"]
        assert any(
            err in r.getMessage() for r in caplog.records if r.name == "device_agent.mqtt"
        )  # and in the log
        assert (
            "authoriz" in health["mqtt"]["last_error"].lower()
            or "password" in health["mqtt"]["last_error"].lower()
        )
        assert d.outbox.depth()[0] >= 1  # windows wait on disk
    finally:
        d.stop()


@pytest.mark.timeout(60)
def test_broker_that_never_answers(tmp_path: Path, x_test: np.ndarray) -> None:
    """A listener that accepts TCP but never sends CONNACK: inference works, health names the timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    d = start_daemon(tmp_path, f"mqtt://127.0.0.1:{srv.getsockname()[1]}", window_max_samples=2)
    try:
        code, out = http(base(d), "/v1/predict", {"inputs": x_test[0].tolist()})
        assert code == 200
        health = wait_for(
            lambda: (h := http(base(d), "/v1/health")[1])["mqtt"]["last_error"] and h, what="error"
        )
        assert "CONNACK" in health["mqtt"]["last_error"]
        assert health["mqtt"]["connected"] is False
    finally:
        d.stop()
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


@pytest.mark.timeout(60)
def test_commands_reach_the_handler_and_a_bad_one_does_not_stop_telemetry(
    tmp_path: Path, mosquitto, x_test
) -> None:
    col = Collector(mosquitto.port)
    d = start_daemon(tmp_path, mosquitto.url, window_max_samples=2)
    got: list[tuple[str, bytes]] = []

    def handler(topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise ValueError("bad command")
        got.append((topic, payload))

    d.set_command_handler(handler)
    try:
        wait_for(lambda: d.publisher.connected, what="connection")
        time.sleep(0.3)  # SUBACK
        col.publish("edgefleet/lab/pi-001/cmd", b"boom")
        col.publish("edgefleet/lab/pi-001/cmd", b'{"hello": 1}')
        col.publish("edgefleet/lab/cmd", b"fleet-wide")
        wait_for(lambda: len(got) == 2, what="two commands")
        assert got == [("edgefleet/lab/pi-001/cmd", b'{"hello": 1}'), ("edgefleet/lab/cmd", b"fleet-wide")]
        d.agent.predict(x_test[:2])
        wait_for(lambda: col.seqs(), what="a window after the bad command")
    finally:
        d.stop()
        col.close()


@pytest.mark.timeout(60)
def test_embedded_amqtt_broker_mqtt311_fallback(tmp_path: Path, x_test: np.ndarray) -> None:
    pytest.importorskip("amqtt")
    from device_agent.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        col = Collector(broker.port, protocol="3.1.1")
        d = start_daemon(tmp_path, broker.url, window_max_samples=4)
        try:
            for i in range(3):
                d.agent.predict(x_test[i * 4 : (i + 1) * 4])
            wait_for(lambda: len(col.seqs()) >= 3, what="3 windows via amqtt")
            assert col.seqs()[:3] == [1, 2, 3]
            assert d.publisher.health()["protocol"] == "MQTT 3.1.1"
            # The subscriber can see the last window before the agent has handled its PUBACK.
            wait_for(lambda: d.outbox.depth()[0] == 0, what="the outbox to drain")
        finally:
            d.stop()
            col.close()


@pytest.mark.timeout(60)
def test_mutual_tls_with_ca_client_certificate_and_key(tmp_path: Path, mosquitto, x_test: np.ndarray) -> None:
    tls = make_tls(tmp_path / "tls")
    reconfigure(
        mosquitto,
        f"cafile {tls['ca.crt']}\ncertfile {tls['server.crt']}\nkeyfile {tls['server.key']}\n"
        "require_certificate true\n",
    )
    url = f"mqtts://127.0.0.1:{mosquitto.port}"
    d = start_daemon(
        tmp_path,
        url,
        window_max_samples=2,
        extra_mqtt=(
            f'ca_file = "{tls["ca.crt"]}"\ncert_file = "{tls["client.crt"]}"\n'
            f'key_file = "{tls["client.key"]}"'
        ),
    )
    try:
        d.agent.predict(x_test[:2])
        wait_for(
            lambda: d.publisher.connected and d.outbox.depth()[0] == 0 and d.windows_written == 1,
            what="a window acknowledged over TLS",
        )
        assert d.publisher.acked >= 1
    finally:
        d.stop()
    # without the client certificate the broker refuses the handshake; health says why
    d = start_daemon(
        tmp_path / "nocert", url, window_max_samples=2, extra_mqtt=f'ca_file = "{tls["ca.crt"]}"'
    )
    try:
        health = wait_for(
            lambda: (h := http(base(d), "/v1/health")[1])["mqtt"]["last_error"] and h, what="error"
        )
        assert health["mqtt"]["connected"] is False
    finally:
        d.stop()
