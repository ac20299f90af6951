"""``edgefleet fleet broker-config`` against a real Mosquitto running the files it writes (issue 12,
findings 2 and 3).

Finding 2: on an open broker any client can publish another device's windows, and the collector
stores the forgery in place of the real window. Finding 3: with Mosquitto's default queue (1000
messages) a collector that is away while 3,000 windows arrive gets 1,000, although the broker
acknowledged all 3,000. Each finding is reproduced on a default broker first, then shown fixed by the
generated configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from device_agent.config import load_config
from device_agent.formats.telemetry import MAX_PAYLOAD_BYTES, ModelRef
from tests.conftest import Mosquitto, free_port, missing_service, mosquitto_binary, wait_port
from tests.helpers import stop_process, wait_for
from toolchain.cli import main
from toolchain.fleet.brokerconf import (
    COLLECTOR_USER,
    check_password,
    hash_password,
    queue_size,
)
from toolchain.fleet.quarantine import MAX_PACKET_BYTES

pytestmark = [pytest.mark.timeout(180)]
FLEET = "lab"


# --------------------------------------------------------------------------------------------------
# helpers


def broker_config(out: Path, *args: str) -> dict[str, Any]:
    """Run ``edgefleet fleet broker-config --json`` in-process; return its JSON."""
    res = CliRunner().invoke(main, ["fleet", "broker-config", "--out", str(out), "--json", *args])
    assert res.exit_code == 0, res.output
    return dict(json.loads(res.output))


def credentials(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "credentials.json").read_text()))


class GeneratedBroker:
    """Mosquitto started with exactly the ``mosquitto.conf`` broker-config wrote."""

    def __init__(self, out: Path, port: int) -> None:
        self.conf = out / "mosquitto.conf"
        self.port = port
        self.log = out / "mosquitto.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = mosquitto_binary()
        assert binary
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=fh, stderr=fh)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None

    def stop(self) -> None:
        stop_process(self.proc, 15)  # a clean stop: Mosquitto saves its persistence file
        self.proc = None


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[tuple[Path, GeneratedBroker]]:
    """A broker config for devices cam-a, cam-b and cam-c, and Mosquitto running it."""
    if not mosquitto_binary():
        missing_service("mosquitto (apt-get install mosquitto)")
    out, port = tmp_path / "broker", free_port()
    # As root Mosquitto switches to the user 'mosquitto', which cannot enter pytest's private temp
    # folders; --run-as writes 'user root' (and would chown the files to any other user).
    run_as = ["--run-as", "root"] if os.geteuid() == 0 else []
    args = ["--fleet", FLEET, "--port", str(port), "--bind", "127.0.0.1", "--host", "127.0.0.1", *run_as]
    broker_config(out, *args, "--device", "cam-a", "--device", "cam-b", "--device", "cam-c")
    broker = GeneratedBroker(out, port)
    broker.start()
    try:
        yield out, broker
    finally:
        broker.stop()


class Client:
    """A paho MQTT 5 client that records its CONNACK, SUBACK, PUBACK reason codes and messages."""

    def __init__(
        self,
        port: int,
        username: str | None = None,
        password: str | None = None,
        client_id: str = "",
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.max_inflight_messages_set(100)
        self.c.max_queued_messages_set(0)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.connack: Any = None
        self.connected = threading.Event()
        self.suback: list[Any] = []
        self.puback: dict[int, Any] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.disconnected = threading.Event()
        self.lock = threading.Lock()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.suback.extend(codes)
        self.c.on_publish = self._on_publish
        self.c.on_message = self._on_message
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        self.c.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=props)
        self.c.loop_start()
        assert self.connected.wait(10), "no CONNACK within 10 s"

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc
        self.connected.set()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.puback[mid] = rc

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    @property
    def ok(self) -> bool:
        return not self.connack.is_failure

    def publish_acked(self, topic: str, payloads: list[bytes], timeout_s: float = 60) -> list[Any]:
        """Publish QoS 1 and return every PUBACK reason code (in publish order)."""
        mids = [self.c.publish(topic, p, qos=1).mid for p in payloads]
        wait_for(lambda: all(m in self.puback for m in mids), timeout_s, f"{len(mids)} PUBACKs")
        return [self.puback[m] for m in mids]

    def subscribe(self, topic: str) -> Any:
        n = len(self.suback)
        self.c.subscribe(topic, qos=1)
        wait_for(lambda: len(self.suback) > n, 10, "SUBACK")
        return self.suback[n]

    def received(self, topic_prefix: str = "") -> list[tuple[str, bytes]]:
        with self.lock:
            return [m for m in self.messages if m[0].startswith(topic_prefix)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# --------------------------------------------------------------------------------------------------
# the files


def test_passwords_are_hashed_as_mosquitto_passwd_hashes_them(tmp_path: Path) -> None:
    h = hash_password("s3cret €", salt=bytes(range(12)))
    assert h.startswith("$7$101$AAECAwQFBgcICQoL$") and len(h.split("$")[4]) == 88
    assert check_password("s3cret €", h) and not check_password("s3cret", h)
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        missing_service("mosquitto_passwd (apt-get install mosquitto)")
    pw = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(pw), "dev", "pa:ss word"], check=True, capture_output=True)
    theirs = pw.read_text().strip().split(":", 1)[1]
    salt = __import__("base64").b64decode(theirs.split("$")[3])
    assert hash_password("pa:ss word", salt=salt) == theirs  # byte for byte, given their salt
    assert check_password("pa:ss word", theirs)


def test_the_queue_holds_a_day_of_windows_and_the_packet_limit_is_the_collectors(tmp_path: Path) -> None:
    assert queue_size(2, 60.0) == 3168  # 2 devices x 1,440 windows a day x 1.1
    assert queue_size(1, 3600.0) == 1000  # never below Mosquitto's default
    assert queue_size(100, 10.0, days=2) == 100 * 8640 * 2 * 11 // 10
    got = broker_config(
        tmp_path / "b", "--fleet", FLEET, "--device", "d1", "--device", "d2", "--window-s", "30"
    )
    conf = (tmp_path / "b" / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf and "persistence true" in conf
    assert f"persistence_location {tmp_path / 'b' / 'data'}/" in conf
    assert got["max_queued_messages"] == 2 * 2880 * 11 // 10 >= 2 * 2880  # 2 devices, 2,880 windows a day
    assert f"max_queued_messages {got['max_queued_messages']}" in conf
    assert f"max_packet_size {MAX_PACKET_BYTES}" in conf and MAX_PACKET_BYTES > MAX_PAYLOAD_BYTES
    assert "listener 1883" in conf and not any(line.startswith("user ") for line in conf)


def test_rerun_adds_devices_and_keeps_every_password(tmp_path: Path) -> None:
    out = tmp_path / "b"
    old = os.umask(0)  # the secrets must be private whatever the umask
    try:
        broker_config(out, "--fleet", FLEET, "--device", "cam-1", "--device", "cam-2")
        first, passwd1 = credentials(out), (out / "passwd").read_text().splitlines()
        got = broker_config(out, "--fleet", FLEET, "--device", "cam-2", "--device", "cam-3")
    finally:
        os.umask(old)
    second, passwd2 = credentials(out), (out / "passwd").read_text().splitlines()
    assert got["added"] == ["cam-3"] and got["devices"] == ["cam-1", "cam-2", "cam-3"]
    assert second["collector"] == first["collector"]
    for d in ("cam-1", "cam-2"):
        assert second["devices"][d] == first["devices"][d]
    assert passwd2[:3] == passwd1  # existing hash lines untouched; one line added
    users = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in passwd2}
    assert set(users) == {COLLECTOR_USER, "cam-1", "cam-2", "cam-3"}
    assert all(check_password(second["devices"][d]["password"], users[d]) for d in second["devices"])
    assert "password" not in (out / "passwd").read_text() and all(
        e["password"] not in (out / "passwd").read_text() for e in second["devices"].values()
    )
    for private in ("credentials.json", "passwd", "collector.password", "agents/cam-3.password"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private
    assert stat.S_IMODE((out / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((out / "agents").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "acl").stat().st_mode) == 0o644
    acl = (out / "acl").read_text()
    assert "user cam-3\ntopic write edgefleet/lab/cam-3/stats" in acl and "pattern" not in acl


def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    broker_config(out, "--fleet", FLEET, "--device", "cam-1")
    before = credentials(out)
    r = CliRunner().invoke(
        main, ["fleet", "broker-config", "--out", str(out), "--fleet", "other", "--device", "x"]
    )
    assert r.exit_code == 1 and "holds the broker config of fleet 'lab'" in r.output
    r = CliRunner().invoke(
        main, ["fleet", "broker-config", "--out", str(out), "--fleet", FLEET, "--device", "Cam/1"]
    )
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1
    r = CliRunner().invoke(
        main, ["fleet", "broker-config", "--out", str(out), "--fleet", FLEET, "--cafile", "ca.pem"]
    )
    assert r.exit_code == 2 and "--certfile" in r.output
    assert credentials(out) == before
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = CliRunner().invoke(
        main, ["fleet", "broker-config", "--out", str(shared), "--fleet", FLEET, "--device", "x"]
    )
    assert (
        r.exit_code == 1 and f"chmod 755 {shared}" in r.output and not (shared / "credentials.json").exists()
    )


# --------------------------------------------------------------------------------------------------
# finding 2: a device speaking for another


def _windows(device: str, seqs: range, n: int) -> list[tuple[str, bytes]]:
    """Real stats windows of ``n`` digits each (the count tells whose window the collector stored)."""
    from toolchain.fleet.sim import digits_baseline, load_digits, stats_payload, window_profile

    base, model = _DIGITS.setdefault("m", digits_baseline())
    x = load_digits()["x_test"][:n]
    prof = window_profile(base.spec, x, model.predict(x))
    return [stats_payload(device, s, _DIGITS["ref"], prof, fleet=FLEET) for s in seqs]


_DIGITS: dict[str, Any] = {}


@pytest.mark.broker
def test_finding2_on_an_open_broker_a_neighbour_replaces_a_devices_windows(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The finding as it was: Mosquitto with anonymous clients and no ACL."""
    from toolchain.fleet.collector import Collector
    from toolchain.fleet.registry import register_bundle
    from toolchain.fleet.sim import digits_baseline, write_bundle
    from toolchain.fleet.storage import open_store

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    _DIGITS["m"] = base_model = _DIGITS.get("m") or digits_baseline()
    bundle, sha = write_bundle(tmp_path / "bundle", base_model[0])
    _DIGITS["ref"] = ModelRef("digits", 1, sha)
    register_bundle(db, bundle)
    col = Collector(db, mosquitto.url, fleet=FLEET, client_id="c-open", evaluate=False, worker_processes=0)
    col.start()
    try:
        assert col.wait_ready(20)
        spoofer = Client(mosquitto.port)  # anyone: no user name
        codes = spoofer.publish_acked(
            "edgefleet/lab/cam-b/stats", [p for _, p in _windows("cam-b", range(1, 6), 7)]
        )
        assert not any(rc.is_failure for rc in codes)
        wait_for(lambda: col.counters.stored >= 5, 30, "the forged windows stored")
        real = Client(mosquitto.port)
        real.publish_acked("edgefleet/lab/cam-b/stats", [p for _, p in _windows("cam-b", range(1, 6), 50)])
        wait_for(lambda: col.counters.duplicates >= 5, 30, "the real windows refused as duplicates")
    finally:
        col.stop()
    with open_store(db) as s:
        counts = sorted(r[0] for r in s.query("SELECT count FROM windows WHERE device_id = 'cam-b'"))
    assert counts == [7] * 5  # the neighbour's windows stand; the device's real ones are gone


@pytest.mark.broker
def test_generated_config_locks_each_device_to_its_own_topics(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    from toolchain.fleet.collector import Collector
    from toolchain.fleet.registry import register_bundle
    from toolchain.fleet.sim import digits_baseline, write_bundle
    from toolchain.fleet.storage import open_store

    out, broker = locked
    creds = credentials(out)
    dev = creds["devices"]
    port = broker.port

    # Nobody gets in without the right password.
    anon = Client(port)
    assert anon.connack.is_failure and "authori" in str(anon.connack).lower()
    wrong = Client(port, "cam-a", "not-the-password")
    assert wrong.connack.is_failure
    for c in (anon, wrong):
        c.close()

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    _DIGITS["m"] = base_model = _DIGITS.get("m") or digits_baseline()
    bundle, sha = write_bundle(tmp_path / "bundle", base_model[0])
    _DIGITS["ref"] = ModelRef("digits", 1, sha)
    register_bundle(db, bundle)
    col_creds = creds["collector"]
    col = Collector(
        db,
        f"mqtt://127.0.0.1:{port}",
        fleet=FLEET,
        client_id=col_creds["client_id"],
        username=col_creds["username"],
        password=(out / "collector.password").read_text().strip(),
        evaluate=False,
        worker_processes=0,
    )
    col.start()
    try:
        assert col.wait_ready(20), "the collector user cannot subscribe"
        # Device A, with its own valid credentials, forges device B's windows: the broker refuses.
        a = Client(port, "cam-a", dev["cam-a"]["password"], dev["cam-a"]["client_id"])
        assert a.ok
        forged = a.publish_acked(
            "edgefleet/lab/cam-b/stats", [p for _, p in _windows("cam-b", range(1, 6), 7)]
        )
        assert all(rc.is_failure and "authori" in str(rc).lower() for rc in forged)
        # Nor can it read another device's commands or the fleet's telemetry.
        a.subscribe("edgefleet/lab/#")
        # Device B's real windows and A's own arrive.
        b = Client(port, "cam-b", dev["cam-b"]["password"], dev["cam-b"]["client_id"])
        assert b.ok
        assert not any(
            rc.is_failure
            for rc in b.publish_acked(
                "edgefleet/lab/cam-b/stats", [p for _, p in _windows("cam-b", range(1, 6), 50)]
            )
        )
        assert not any(
            rc.is_failure
            for rc in a.publish_acked(
                "edgefleet/lab/cam-a/stats", [p for _, p in _windows("cam-a", range(1, 3), 30)]
            )
        )
        # The collector user writes commands; B reads its own, A reads none of B's.
        cmd = Client(port, COLLECTOR_USER, col_creds["password"], "operator-test")
        b.subscribe("edgefleet/lab/cam-b/cmd")
        assert not any(rc.is_failure for rc in cmd.publish_acked("edgefleet/lab/cam-b/cmd", [b"{}"]))
        wait_for(lambda: b.received("edgefleet/lab/cam-b/cmd"), 10, "B's command")
        # The collector user cannot forge telemetry either.
        assert all(
            rc.is_failure
            for rc in cmd.publish_acked(
                "edgefleet/lab/cam-c/stats", [p for _, p in _windows("cam-c", range(1, 2), 9)]
            )
        )
        wait_for(lambda: col.counters.stored >= 7, 30, "7 windows stored")
        # A sentinel from B after everything else: once stored, nothing earlier is still on its way.
        b.publish_acked("edgefleet/lab/cam-b/stats", [p for _, p in _windows("cam-b", range(6, 7), 50)])
        wait_for(lambda: col.counters.stored >= 8, 30, "the sentinel window")
        assert a.received() == []  # A saw neither B's windows nor B's command
        for c in (a, b, cmd):
            c.close()
    finally:
        col.stop()
    assert col.counters.duplicates == 0 and col.counters.quarantined == 0
    with open_store(db) as s:
        rows = sorted(s.query("SELECT device_id, seq, count FROM windows"))
    assert rows == [("cam-a", 1, 30), ("cam-a", 2, 30)] + [("cam-b", s, 50) for s in range(1, 7)]
    assert "not authorised" in broker.log.read_text().lower() or "denied" in broker.log.read_text().lower()


@pytest.mark.broker
def test_the_agent_snippet_is_a_valid_agent_config_that_connects(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    out, broker = locked
    snippet = (out / "agents" / "cam-c.toml").read_text()
    cfg_path = out / "agents" / "agent.toml"  # beside cam-c.password, as the snippet says
    cfg_path.write_text(
        f'[agent]\ndevice_id = "cam-c"\nfleet = "{FLEET}"\nbundle = "{tmp_path}/bundle"\n'
        f'state_dir = "{tmp_path}/state"\nallow_unsigned = true\n\n{snippet}'
    )
    cfg = load_config(cfg_path)  # the agent's own loader: every key is one the agent knows
    m = cfg.mqtt
    assert m is not None and m.username == "cam-c" and m.port == broker.port
    c = Client(m.port, m.username, m.password(), m.client_id or "")
    assert c.ok
    codes = c.publish_acked("edgefleet/lab/cam-c/status", [b'{"x": 1}'])
    assert not any(rc.is_failure for rc in codes)
    c.close()


@pytest.mark.broker
def test_oversized_packets_stop_at_the_broker(locked: tuple[Path, GeneratedBroker]) -> None:
    out, broker = locked
    creds = credentials(out)
    col = Client(broker.port, COLLECTOR_USER, creds["collector"]["password"], "big-reader")
    col.subscribe("edgefleet/lab/+/stats")
    dev = creds["devices"]["cam-a"]
    a = Client(broker.port, "cam-a", dev["password"], dev["client_id"])
    a.publish_acked("edgefleet/lab/cam-a/stats", [b"x" * MAX_PAYLOAD_BYTES])  # the collector's limit: passes
    wait_for(lambda: len(col.received()) == 1, 10, "the largest allowed payload")
    a.c.publish("edgefleet/lab/cam-a/stats", b"x" * (MAX_PACKET_BYTES + 1), qos=1)
    assert a.disconnected.wait(10), "a client sending an oversized packet is disconnected"
    ok = Client(broker.port, "cam-b", creds["devices"]["cam-b"]["password"], "cam-b-after")
    ok.publish_acked("edgefleet/lab/cam-b/stats", [b"after"])
    wait_for(lambda: len(col.received()) == 2, 10, "the next message")
    assert [len(p) for _, p in col.received()] == [MAX_PAYLOAD_BYTES, 5]
    for c in (a, ok, col):
        c.close()


# --------------------------------------------------------------------------------------------------
# finding 3: the broker's queue for an absent collector


N_WINDOWS = 3000


def _queue_trial(
    port: int, collector: dict[str, str], device: dict[str, str], restart: Any = None
) -> tuple[int, int]:
    """Collector session away while a device sends N_WINDOWS; return (PUBACKed, delivered to the collector)."""
    user, pw = collector.get("username"), collector.get("password")
    cid = collector.get("client_id", "queue-collector")
    first = Client(port, user, pw, cid, clean_start=False, session_expiry_s=3600)
    first.subscribe("edgefleet/lab/+/stats")
    first.close()  # away: its persistent session stays with the broker
    dev = Client(port, device.get("username"), device.get("password"), device.get("client_id", ""))
    codes = dev.publish_acked("edgefleet/lab/cam-a/stats", [str(i).encode() for i in range(N_WINDOWS)], 120)
    acked = sum(not rc.is_failure for rc in codes)
    dev.close()
    if restart is not None:
        restart()
    back = Client(port, user, pw, cid, clean_start=False, session_expiry_s=3600)
    # The sentinel is queued behind everything that was kept: once it arrives, the rest has.
    dev2 = Client(port, device.get("username"), device.get("password"), device.get("client_id", ""))
    dev2.publish_acked("edgefleet/lab/cam-a/stats", [b"sentinel"])
    wait_for(lambda: any(p == b"sentinel" for _, p in back.received()), 60, "the sentinel")
    got = len({p for _, p in back.received() if p != b"sentinel"})
    for c in (back, dev2):
        c.close()
    return acked, got


@pytest.mark.broker
def test_finding3_the_default_queue_drops_acknowledged_windows(mosquitto: Mosquitto) -> None:
    acked, got = _queue_trial(mosquitto.port, {}, {})
    assert acked == N_WINDOWS  # every window acknowledged to the device (which deletes it) ...
    assert (
        got < N_WINDOWS and got <= 1000 + 20
    )  # ... yet only Mosquitto's default queue reached the collector


@pytest.mark.broker
def test_generated_config_keeps_a_day_of_windows_across_a_broker_restart(
    locked: tuple[Path, GeneratedBroker],
) -> None:
    out, broker = locked
    creds = credentials(out)
    assert json.loads(json.dumps(creds))["collector"]["username"] == COLLECTOR_USER
    # 3 devices x 1,440 windows a day x 1.1 = 4,752 >= 3,000 windows from one of them.
    dev = creds["devices"]["cam-a"]

    def restart() -> None:
        broker.stop()  # SIGTERM: Mosquitto writes the queued session to DIR/data
        broker.start()

    acked, got = _queue_trial(broker.port, creds["collector"], dev, restart)
    assert acked == N_WINDOWS and got == N_WINDOWS
    assert (out / "data" / "mosquitto.db").is_file()


@pytest.mark.broker
def test_tls_options_write_a_tls_listener_that_mosquitto_serves(tmp_path: Path) -> None:
    from tests.device_agent.agent_helpers import make_tls

    if not mosquitto_binary():
        missing_service("mosquitto (apt-get install mosquitto)")
    tls = make_tls(tmp_path / "tls")
    out, port = tmp_path / "b", free_port()
    run_as = ["--run-as", "root"] if os.geteuid() == 0 else []
    tls_args = ["--cafile", str(tls["ca.crt"]), "--certfile", str(tls["server.crt"])]
    tls_args += ["--keyfile", str(tls["server.key"])]
    assert (
        broker_config(tmp_path / "default-port", "--fleet", FLEET, "--device", "d1", *tls_args)["port"]
        == 8883
    )
    broker_config(
        out, "--fleet", FLEET, "--device", "d1", "--port", str(port), "--host", "127.0.0.1", "--bind", "127.0.0.1",
        *tls_args, *run_as,
    )  # fmt: skip
    conf = (out / "mosquitto.conf").read_text()
    assert f"cafile {tls['ca.crt']}\ncertfile {tls['server.crt']}\nkeyfile {tls['server.key']}\n" in conf
    snippet = (out / "agents" / "d1.toml").read_text()
    assert f'url = "mqtts://127.0.0.1:{port}"' in snippet and 'ca_file = "ca.crt"' in snippet
    broker = GeneratedBroker(out, port)
    broker.start()
    try:
        import paho.mqtt.client as mqtt

        creds = credentials(out)["devices"]["d1"]
        results: dict[str, Any] = {}
        for name, use_tls in (("tls", True), ("plain", False)):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            c.username_pw_set("d1", creds["password"])
            if use_tls:
                c.tls_set(ca_certs=str(tls["ca.crt"]))
            ev = threading.Event()
            c.on_connect = lambda cl, u, f, rc, p, name=name, ev=ev: (results.__setitem__(name, rc), ev.set())
            try:
                c.connect("127.0.0.1", port, keepalive=10)
                c.loop_start()
                ev.wait(10 if use_tls else 3)  # a plain client on a TLS port never gets a CONNACK
            except OSError as e:
                results[name] = e
            finally:
                c.loop_stop()
                c.disconnect()
        assert not results["tls"].is_failure  # the generated TLS listener and password work together
        assert (
            results.get("plain") is None
            or isinstance(results["plain"], OSError)
            or results["plain"].is_failure
        )
    finally:
        broker.stop()


@pytest.mark.broker
def test_operator_flash_with_the_collector_password_file_reaches_only_its_device(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    from toolchain.fleet.sim import digits_baseline, write_bundle

    out, broker = locked
    creds = credentials(out)
    bundle, _ = write_bundle(tmp_path / "bundle", digits_baseline()[0])
    a_creds, b_creds = creds["devices"]["cam-a"], creds["devices"]["cam-b"]
    a = Client(broker.port, "cam-a", a_creds["password"], a_creds["client_id"])
    b = Client(broker.port, "cam-b", b_creds["password"], b_creds["client_id"])
    for c in (a, b):
        c.subscribe(f"edgefleet/lab/{c.c._username.decode()}/cmd")
        c.subscribe("edgefleet/lab/bundles/#")
    to = f"mqtt://{COLLECTOR_USER}@127.0.0.1:{broker.port}/lab/cam-a"
    r = CliRunner().invoke(
        main, ["flash", str(bundle), "--to", to, "--password-file", str(out / "collector.password")]
    )
    assert r.exit_code == 0, r.output
    assert "Warning" not in r.output
    wait_for(lambda: a.received("edgefleet/lab/cam-a/cmd"), 20, "cam-a's deploy command")
    wait_for(lambda: a.received("edgefleet/lab/bundles/"), 20, "the bundle chunks")
    assert b.received("edgefleet/lab/cam-a/cmd") == []
    for c in (a, b):
        c.close()


AGENT_PRELUDE = "from device_agent.cli import main; main()"


@pytest.mark.broker
def test_real_agents_with_the_generated_snippets(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    """Two real ``edgefleet-agent run`` processes and the real collector on the generated broker: the agent
    configured with its own snippet gets its windows stored; one that claims another device's id with
    those credentials is refused by the broker, says so in its health, and nothing of it is stored."""
    import numpy as np

    from tests.fabricate import fit_softmax, flat_onnx_bundle, onnx_dense
    from tests.helpers import AgentRun, http_call
    from toolchain.fleet.collector import Collector
    from toolchain.fleet.registry import register_bundle
    from toolchain.fleet.storage import open_store

    out, broker = locked
    creds = credentials(out)
    data = np.load(Path(__file__).resolve().parents[2] / "calibration_data" / "digits.npz")
    x, y = data["x"], data["y"]
    w, b = fit_softmax(x, y, steps=30)
    bundle = flat_onnx_bundle(tmp_path / "bundle", onnx_dense(w, b, ["n", w.shape[0]]), x[:300])
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    register_bundle(db, bundle)

    def agent_config(device_id: str, snippet_of: str) -> Path:
        path = out / "agents" / f"run-{device_id}.toml"  # beside <id>.password, as the snippet says
        path.write_text(
            f'[agent]\ndevice_id = "{device_id}"\nfleet = "{FLEET}"\nbundle = "{bundle}"\n'
            f'state_dir = "{tmp_path / ("state-" + device_id)}"\nallow_unsigned = true\n\n'
            '[api]\nlisten = "127.0.0.1:0"\n\n[telemetry]\nwindow_s = 1\n\n'
            + (out / "agents" / f"{snippet_of}.toml").read_text()
        )
        return path

    col_creds = creds["collector"]
    col = Collector(
        db,
        f"mqtt://127.0.0.1:{broker.port}",
        fleet=FLEET,
        client_id=col_creds["client_id"],
        username=col_creds["username"],
        password=col_creds["password"],
        evaluate=False,
        worker_processes=0,
    )
    col.start()
    honest = AgentRun(AGENT_PRELUDE, agent_config("cam-c", "cam-c"), tmp_path / "honest.log")
    # cam-a's credentials, cam-b's device id: what a compromised or misconfigured device would do.
    liar = AgentRun(AGENT_PRELUDE, agent_config("cam-b", "cam-a"), tmp_path / "liar.log")
    try:
        assert col.wait_ready(20)
        rows = x[:40].reshape(40, -1).tolist()
        for agent in (honest, liar):
            code, doc = http_call(agent.api_base() + "/v1/predict", {"inputs": rows})
            assert code == 200, doc

        def stored_of(device: str) -> int:
            with open_store(db) as s:
                return int(s.query("SELECT COUNT(*) FROM windows WHERE device_id = ?", (device,))[0][0])

        wait_for(lambda: stored_of("cam-c") >= 1, 60, "cam-c's window in the database")

        def liar_refused() -> Any:
            code, doc = http_call(liar.api_base() + "/v1/health")
            err = (doc.get("mqtt") or {}).get("last_error") or ""
            return "authori" in err.lower() and doc

        h = wait_for(liar_refused, 60, "the impostor's health to show the broker's refusal")
        assert h["outbox"]["rows"] >= 1  # kept on the device, not lost
        assert stored_of("cam-b") == 0
    finally:
        for agent in (honest, liar):
            agent.stop()
        col.stop()
    with open_store(db) as s:
        devices = dict(s.query("SELECT device_id, agent_version FROM devices"))
    assert "cam-c" in devices and "cam-b" not in devices  # not even its status got through


@pytest.mark.broker
def test_flash_with_credentials_that_may_not_write_commands_fails_loudly(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    """A device's credentials may not publish commands or bundle chunks: flash says so (MQTT 5 PUBACK)
    instead of reporting a deployment that no device will ever see."""
    from toolchain.fleet.sim import digits_baseline, write_bundle

    out, broker = locked
    bundle, _ = write_bundle(tmp_path / "bundle", digits_baseline()[0])
    pw = str(out / "agents" / "cam-b.password")
    for extra in ([], ["--url", "http://127.0.0.1:1/b/"]):  # refused chunks; refused command
        to = f"mqtt://cam-b@127.0.0.1:{broker.port}/lab/cam-a"
        r = CliRunner().invoke(main, ["flash", str(bundle), "--to", to, "--password-file", pw, *extra])
        assert r.exit_code == 1, r.output
        assert r.output.startswith("Error: the broker refused the message on edgefleet/lab/")
        assert "Not authorized" in r.output and r.output.count("\n") == 1


@pytest.mark.broker
def test_only_the_collector_reads_the_brokers_sys_counters(locked: tuple[Path, GeneratedBroker]) -> None:
    """The collector watches $SYS drop counters; devices learn nothing about the broker or its clients."""
    out, broker = locked
    creds = credentials(out)
    col = Client(broker.port, COLLECTOR_USER, creds["collector"]["password"], "sys-reader")
    dev = creds["devices"]["cam-a"]
    a = Client(broker.port, "cam-a", dev["password"], dev["client_id"])
    a.subscribe("$SYS/broker/#")
    col.subscribe("$SYS/broker/#")  # Mosquitto retains $SYS values: they arrive at once
    wait_for(lambda: col.received("$SYS/broker/publish/messages/dropped"), 20, "the dropped counter")
    # A sentinel the device may read, sent after the $SYS values: once it is in, nothing else is coming.
    col.publish_acked("edgefleet/lab/cmd", [b"{}"])
    a.subscribe("edgefleet/lab/cmd")
    col.publish_acked("edgefleet/lab/cmd", [b"sentinel"])
    wait_for(lambda: a.received("edgefleet/lab/cmd"), 10, "the sentinel")
    assert a.received("$SYS") == []
    for c in (a, col):
        c.close()


@pytest.mark.broker
def test_devices_publish_captured_samples_on_their_own_topic_only(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    """[capture] with a generated config: a device's samples reach the collector; a neighbour's forgery does not."""
    import numpy as np

    from device_agent.formats.samples import Sample, encode_samples
    from toolchain.fleet.collector import Collector

    out, broker = locked
    creds = credentials(out)
    x = np.arange(6, dtype=np.float32)
    s = Sample("id-a1", 1_800_000_000.0, "ab" * 32, "1", "float32", (6,), x.tobytes(), 0, (1.0, 0.0))

    def payload(device: str) -> bytes:
        return encode_samples(device_id=device, fleet=FLEET, stream="0123456789abcdef", seq=1, samples=[s])

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    cc = creds["collector"]
    col = Collector(
        db,
        f"mqtt://127.0.0.1:{broker.port}",
        fleet=FLEET,
        client_id=cc["client_id"],
        username=cc["username"],
        password=(out / "collector.password").read_text().strip(),
        evaluate=False,
        worker_processes=0,
    ).start()
    try:
        assert col.wait_ready(20)
        dev = creds["devices"]["cam-a"]
        a = Client(broker.port, "cam-a", dev["password"], dev["client_id"])
        assert not any(
            rc.is_failure for rc in a.publish_acked("edgefleet/lab/cam-a/samples", [payload("cam-a")])
        )
        forged = a.publish_acked("edgefleet/lab/cam-b/samples", [payload("cam-b")])
        assert all(rc.is_failure for rc in forged)
        wait_for(lambda: col.counters.samples_stored >= 1, 20, "cam-a's sample stored")
        a.close()
    finally:
        col.stop()
    assert col.counters.samples_stored == 1 and col.counters.quarantined == 0


@pytest.mark.broker
def test_the_real_collector_stores_every_window_sent_while_it_was_away(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    """Finding 3 end to end: the collector stops, 3,000 windows are acknowledged to a device, the broker is
    restarted, the collector comes back under its client id and stores all 3,000 exactly once."""
    from toolchain.fleet.collector import Collector
    from toolchain.fleet.registry import register_bundle
    from toolchain.fleet.sim import digits_baseline, write_bundle
    from toolchain.fleet.storage import open_store

    out, broker = locked
    creds = credentials(out)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    _DIGITS["m"] = base_model = _DIGITS.get("m") or digits_baseline()
    bundle, sha = write_bundle(tmp_path / "bundle", base_model[0])
    _DIGITS["ref"] = ModelRef("digits", 1, sha)
    register_bundle(db, bundle)
    col_creds = creds["collector"]

    def collector() -> Any:
        return Collector(
            db,
            f"mqtt://127.0.0.1:{broker.port}",
            fleet=FLEET,
            client_id=col_creds["client_id"],
            username=col_creds["username"],
            password=col_creds["password"],
            evaluate=False,
            worker_processes=0,
        )

    first = collector()
    first.start()
    assert first.wait_ready(20)
    first.stop()  # away: its persistent session (subscriptions, queue) stays with the broker
    dev = creds["devices"]["cam-a"]
    a = Client(broker.port, "cam-a", dev["password"], dev["client_id"])
    codes = a.publish_acked(
        "edgefleet/lab/cam-a/stats", [p for _, p in _windows("cam-a", range(1, N_WINDOWS + 1), 5)]
    )
    assert sum(not rc.is_failure for rc in codes) == N_WINDOWS  # the device may delete all of them now
    a.close()
    broker.stop()  # a clean restart on the way: the queue is in DIR/data/mosquitto.db
    broker.start()
    back = collector()
    back.start()
    try:
        wait_for(lambda: back.counters.stored >= N_WINDOWS, 120, f"{N_WINDOWS} windows stored")
    finally:
        back.stop()
    with open_store(db) as s:
        seqs = [r[0] for r in s.query("SELECT seq FROM windows WHERE device_id = 'cam-a' ORDER BY seq")]
    assert seqs == list(range(1, N_WINDOWS + 1)) and back.counters.duplicates == 0


@pytest.mark.broker
def test_alert_commands_only_the_collector_writes_and_each_device_reads_its_own(
    locked: tuple[Path, GeneratedBroker],
) -> None:
    """The retained ``.../cmd/alert``: the collector user writes any device's; a device reads only its
    own and can write none (not even its own: it cannot put itself in or out of alert)."""
    from device_agent.formats.alertcmd import alert_command_topic, encode_alert_command

    out, broker = locked
    creds = credentials(out)
    dev = creds["devices"]
    col = Client(broker.port, COLLECTOR_USER, creds["collector"]["password"], "alert-writer")
    a = Client(broker.port, "cam-a", dev["cam-a"]["password"], dev["cam-a"]["client_id"])
    b = Client(broker.port, "cam-b", dev["cam-b"]["password"], dev["cam-b"]["client_id"])
    topic_b = alert_command_topic(FLEET, "cam-b")
    cmd = encode_alert_command(fleet=FLEET, device_id="cam-b", in_alert=True, seq=17)
    mid = col.c.publish(topic_b, cmd, qos=1, retain=True).mid
    wait_for(lambda: mid in col.puback, 10, "the PUBACK")
    assert not col.puback[mid].is_failure
    forged = encode_alert_command(fleet=FLEET, device_id="cam-b", in_alert=False, seq=18)
    assert all(rc.is_failure for rc in a.publish_acked(topic_b, [forged]))  # a neighbour cannot clear it
    own = alert_command_topic(FLEET, "cam-a")
    assert all(rc.is_failure for rc in a.publish_acked(own, [forged]))  # nor write its own
    a.subscribe(f"edgefleet/{FLEET}/+/cmd/alert")
    b.subscribe(topic_b)
    wait_for(lambda: b.received(topic_b), 10, "cam-b's retained alert command")
    assert b.received(topic_b) == [(topic_b, cmd)]  # the collector's, not the forgery
    col.publish_acked(f"edgefleet/{FLEET}/cmd", [b"sentinel"])  # a sentinel cam-a may read
    a.subscribe(f"edgefleet/{FLEET}/cmd")
    col.publish_acked(f"edgefleet/{FLEET}/cmd", [b"sentinel"])
    wait_for(lambda: a.received(f"edgefleet/{FLEET}/cmd"), 10, "the sentinel")
    assert a.received(topic_b) == []
    acl = (out / "acl").read_text()
    assert f"topic write edgefleet/{FLEET}/+/cmd/alert" in acl
    assert f"topic read edgefleet/{FLEET}/cam-a/cmd/alert" in acl
    for c in (a, b, col):
        c.close()


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_a_real_agent_follows_its_retained_alert_command_through_the_generated_acl(
    locked: tuple[Path, GeneratedBroker], tmp_path: Path
) -> None:
    """The agent, configured with its generated snippet, reads the retained ``cmd/alert`` the collector
    user wrote before it connected, and the broker grants every subscription it makes."""
    import device_agent.mqtt as mqtt_mod
    from device_agent.daemon import Daemon
    from device_agent.formats.alertcmd import alert_command_topic, encode_alert_command
    from tests.device_agent.agent_bundles import cached_onnx_bundle

    out, broker = locked
    creds = credentials(out)
    topic = alert_command_topic(FLEET, "cam-c")
    cfg_path = out / "agents" / "run-cam-c.toml"  # beside cam-c.password, as the snippet says
    cfg_path.write_text(
        f'[agent]\ndevice_id = "cam-c"\nfleet = "{FLEET}"\nbundle = "{cached_onnx_bundle()}"\n'
        f'state_dir = "{tmp_path / "state"}"\nallow_unsigned = true\n\n[api]\nlisten = "off"\n\n'
        + (out / "agents" / "cam-c.toml").read_text()
    )
    col = Client(broker.port, COLLECTOR_USER, creds["collector"]["password"], "alert-writer")
    mid = col.c.publish(
        topic, encode_alert_command(fleet=FLEET, device_id="cam-c", in_alert=True, seq=77), qos=1, retain=True
    ).mid
    wait_for(lambda: mid in col.puback, 10, "the PUBACK")
    col.close()
    saved = mqtt_mod.RECONNECT_MAX_S
    mqtt_mod.RECONNECT_MAX_S = 0.5
    try:
        d = Daemon(load_config(cfg_path)).start()
        try:
            wait_for(
                lambda: d.health()["alert_commands"]["in_alert"], 20, "the retained alert command applied"
            )
            h = d.health()
            assert h["alert_commands"]["seq"] == 77 and h["alert_commands"]["refused_total"] == 0
            assert h["mqtt"]["subscribe_refused"] == []
        finally:
            d.stop()
    finally:
        mqtt_mod.RECONNECT_MAX_S = saved
