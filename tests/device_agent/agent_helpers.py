"""Helpers for the agent's integration tests: configs, an MQTT collector, HTTP, daemons in subprocesses."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers import DEADLINE_S, REPO, AgentRun, http_call, wait_for

__all__ = ["DEADLINE_S", "REPO", "wait_for"]


def write_config(
    path: Path,
    *,
    bundle: Path,
    state_dir: Path,
    url: str | None = None,
    device_id: str = "pi-001",
    fleet: str = "lab",
    window_s: float = 60,
    window_max_samples: int = 1000,
    outbox_max_rows: int = 1000,
    listen: str = "127.0.0.1:0",
    extra_agent: str = "",
    extra_mqtt: str = "",
) -> Path:
    """Write an agent.toml for a test."""
    text = (
        f'[agent]\ndevice_id = "{device_id}"\nfleet = "{fleet}"\nbundle = "{bundle}"\n'
        f'state_dir = "{state_dir}"\n'
        f"allow_unsigned = true\n{extra_agent}\n"
        f"[telemetry]\nwindow_s = {window_s}\nwindow_max_samples = {window_max_samples}\n"
        f'outbox_max_rows = {outbox_max_rows}\n\n[api]\nlisten = "{listen}"\n'
    )
    if url:
        text += f'\n[mqtt]\nurl = "{url}"\nkeepalive_s = 5\n{extra_mqtt}\n'
    path.write_text(text)
    return path


class Collector:
    """Subscribe to ``edgefleet/#`` on a broker and keep every message (topic, payload, retain)."""

    def __init__(self, port: int, protocol: str = "5", persistent: bool = False) -> None:
        """``persistent``: an MQTT 3.1.1 session that survives a broker restart (see ``persist``)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        cid = f"collector-{os.getpid()}-{id(self)}"
        if persistent:
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False, protocol=mqtt.MQTTv311
            )
        else:
            proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any = None) -> None:
            c.subscribe("edgefleet/#", qos=1)
            self._ready.set()

        self.client.on_connect = on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho takes floats
        self.port = port
        self.client.connect("127.0.0.1", port, 10)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise AssertionError("collector did not connect")
        time.sleep(0.2)  # let the SUBACK land

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def of_kind(self, kind: str) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.messages if m[0].endswith("/" + kind)]

    def stats(self) -> list[dict[str, Any]]:
        return [json.loads(p) for _, p, _ in self.of_kind("stats")]

    def seqs(self) -> list[int]:
        return [d["seq"] for d in self.stats()]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p) for _, p, _ in self.of_kind("events")]

    def statuses(self) -> list[dict[str, Any]]:
        return [json.loads(p) for _, p, _ in self.of_kind("status")]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def captured_samples(col: Collector, device_id: str = "pi-001", fleet: str = "lab") -> list[Any]:
    """The captured samples the listener received on the samples topic, each message once, in order."""
    from device_agent.formats.samples import decode_samples

    out, seen = [], set()
    for _topic, payload, *_ in col.of_kind("samples"):
        msg = decode_samples(payload, device_id, fleet)
        if msg.seq not in seen:
            seen.add(msg.seq)
            out += list(msg.samples)
    return out


def fast_mqtt(monkeypatch: Any) -> None:
    """Patch the agent's reconnect, connect and shutdown-flush constants short for an in-process test."""
    import device_agent.daemon as daemon_mod
    import device_agent.mqtt as mqtt_mod

    monkeypatch.setattr(mqtt_mod, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(mqtt_mod, "RECONNECT_MAX_S", 0.5)
    monkeypatch.setattr(mqtt_mod, "CONNECT_TIMEOUT_S", 1.5)
    monkeypatch.setattr(mqtt_mod, "V5_CONNACK_TIMEOUT_S", 1.0)
    monkeypatch.setattr(daemon_mod, "SHUTDOWN_FLUSH_S", 1.0)


def reconfigure(mosquitto: Any, extra: str, drop: str = "") -> None:
    """Restart the test's Mosquitto with ``extra`` config lines (and without the line ``drop``)."""
    mosquitto.stop()
    text = mosquitto.conf.read_text()
    if drop:
        text = text.replace(drop, "")
    # Started as root, Mosquitto drops to its own user, which cannot read or write a root-only temp dir.
    user = "user root\n" if os.geteuid() == 0 and "user root" not in text else ""
    mosquitto.conf.write_text(text + user + extra)
    mosquitto.start()


def persist(mosquitto: Any) -> None:
    """Restart the test's Mosquitto with persistence, so queued QoS 1 messages for a persistent
    collector survive a broker stop/start (no race between the agent's and the collector's reconnect)."""
    reconfigure(
        mosquitto, f"persistence true\npersistence_location {mosquitto.workdir}/\n", drop="persistence false"
    )


def http(base: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """Call the agent's API; return (status, parsed JSON or text)."""
    return http_call(base + path, body, raw, timeout_s=10)


# Patch reconnect/backoff constants before the CLI runs (module constants, as the design wants).
FAST_PRELUDE = (
    "import device_agent.mqtt as m, device_agent.daemon as d; "
    "m.RECONNECT_MIN_S = 0.1; m.RECONNECT_MAX_S = 0.5; "
    "m.CONNECT_TIMEOUT_S = 2.0; d.BUNDLE_POLL_S = 0.2; from device_agent.cli import main; main()"
)


class AgentProcess(AgentRun):
    """``edgefleet-agent run`` in a subprocess with fast reconnect constants; its log in a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        super().__init__(FAST_PRELUDE, config, log_path)


def make_tls(d: Path) -> dict[str, Path]:
    """Write a throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(
        subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool, san: Any = None
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            b = b.add_extension(san, critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem: str, c: x509.Certificate, key: Any) -> None:
        (d / f"{stem}.crt").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("edgefleet-test-ca", ca_key, "edgefleet-test-ca", ca_key, True)
    write("ca", ca, ca_key)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    write("server", cert("127.0.0.1", srv_key, "edgefleet-test-ca", ca_key, False, san), srv_key)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    write("client", cert("pi-001", cli_key, "edgefleet-test-ca", ca_key, False), cli_key)
    return {k: d / f"{k}" for k in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}
