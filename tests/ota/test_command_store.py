"""The deploy command decoder, the bundle store's atomic pointer, chunks over MQTT and ``edgefleet serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.formats.broker import BrokerSettings as MqttSettings
from device_agent.formats.deploy import (
    CommandError,
    DeployCommand,
    HttpSource,
    LocalSource,
    MqttSource,
    decode_command,
)
from device_agent.formats.files import StoreError, read_json
from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import VerifyPolicy, load_manifest, manifest_sha256
from device_agent.store import ActiveRef, BundleStore, atomic_write_json
from device_agent.update import parse_update_section
from tests.ota.harness import Serving, make_updater, signed_updater

SHA = "a" * 64


def good() -> dict:
    return {
        "schema": 1,
        "type": "deploy",
        "deployment_id": "d-1",
        "bundle": {"name": "digits", "version": 2, "sha256": SHA, "size_bytes": 1000},
        "source": {"kind": "http", "url": "http://10.0.0.5:8765/digits"},
    }


def enc(d: dict) -> bytes:
    return json.dumps(d).encode()


def test_decode_a_good_command_round_trips() -> None:
    cmd = decode_command(enc(good()))
    assert cmd.source == HttpSource("http://10.0.0.5:8765/digits/")  # base URL normalized
    assert decode_command(cmd.encode()) == cmd
    assert cmd.applies_to("anything")
    mq = DeployCommand(
        "d-2",
        "digits",
        3,
        SHA,
        5000,
        MqttSource("edgefleet/lab/bundles/" + SHA, 2, 4096, 800, 120),
        ("pi-1",),
    )
    back = decode_command(mq.encode())
    assert back == mq and back.applies_to("pi-1") and not back.applies_to("pi-2")


def _mutate(path: str, value: object) -> dict:
    d = good()
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    "path,value,msg",
    [
        ("schema", 2, "schema"),
        ("type", "reboot", "unknown"),
        ("deployment_id", "../x", "deployment_id"),
        ("deployment_id", KeyError, "missing"),
        ("extra", 1, "unknown key"),
        ("bundle.sha256", "A" * 64, "sha256"),
        ("bundle.version", 0, "bundle.version"),
        ("bundle.version", True, "bundle.version"),
        ("bundle.size_bytes", -1, "size_bytes"),
        ("bundle.extra", 1, "unknown key"),
        ("source.url", "file:///etc/passwd", "http"),
        ("source.url", "ftp://x/y", "http"),
        ("source.kind", "smb", "unknown"),
        ("devices", ["Bad Id"], "invalid"),
        ("devices", "pi-1", "list"),
    ],
)
def test_decode_refuses_bad_commands(path: str, value: object, msg: str) -> None:
    with pytest.raises(CommandError, match=msg):
        decode_command(enc(_mutate(path, value)))


def test_decode_refuses_inconsistent_mqtt_sources() -> None:
    d = good()
    d["source"] = {
        "kind": "mqtt",
        "topic": "edgefleet/lab/bundles/#",
        "chunks": 1,
        "chunk_bytes": 4096,
        "manifest_bytes": 10,
        "signature_bytes": 0,
    }
    with pytest.raises(CommandError, match="wildcards"):
        decode_command(enc(d))
    d["source"]["topic"] = "edgefleet/lab/bundles/x"
    assert decode_command(enc(d)).source.chunks == 1  # type: ignore[union-attr]  # 1010 bytes fit one chunk
    d["source"]["chunks"] = 2
    with pytest.raises(CommandError, match="does not cover"):
        decode_command(enc(d))
    d["source"]["chunks"] = 1
    d["bundle"]["size_bytes"] = 5000
    with pytest.raises(CommandError, match="does not cover"):
        decode_command(enc(d))
    d["source"]["chunks"] = 2
    assert decode_command(enc(d)).source.chunks == 2  # type: ignore[union-attr]
    d["bundle"]["size_bytes"] = 64 * 1024 * 1024
    with pytest.raises(CommandError, match="too large"):
        decode_command(enc(d))


def test_decode_refuses_oversized_and_deep_payloads() -> None:
    with pytest.raises(CommandError, match="exceeds"):
        decode_command(b"{" + b" " * 200_000 + b"}")
    with pytest.raises(CommandError, match="nests"):
        decode_command(b"[" * 100 + b"]" * 100)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=400)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    ).map(lambda v: json.dumps(v, default=str).encode())
)
def test_decoder_only_ever_raises_command_error(raw: bytes) -> None:
    try:
        decode_command(raw)
    except CommandError:
        pass


def test_update_config_section() -> None:
    from device_agent.errors import ConfigError

    assert parse_update_section({"health_window_s": 5, "max_bundle_bytes": 10_000}) == {
        "health_window_s": 5.0,
        "max_bundle_bytes": 10_000,
    }
    for bad in (
        {"health_window_s": -1},
        {"max_bundle_bytes": 10},
        {"bogus": 1},
        {"staging_quota_bytes": True},
    ):
        with pytest.raises(ConfigError):
            parse_update_section(bad)


# ------------------------------------------------------------------------------------------------ store


def test_active_pointer_is_replaced_atomically(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    assert store.active() is None and store.inactive_slot() == "a"
    ref = ActiveRef("a", "digits", 2, SHA)
    store.set_active(ref)
    assert store.active() == ref and store.inactive_slot() == "b"
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    store.set_active(None)
    assert store.active() is None
    (store.root / "active.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.active()


def test_atomic_write_never_leaves_a_half_file(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    atomic_write_json(p, {"v": 1})
    stop = threading.Event()
    seen: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(read_json(p)["v"])

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        atomic_write_json(p, {"v": i, "pad": "x" * 5000})
    stop.set()
    t.join()
    assert seen and all(isinstance(v, int) for v in seen)


def test_write_slot_refuses_the_active_slot(tmp_path: Path, make_version) -> None:
    store = BundleStore(tmp_path)
    b = make_version(2)
    store.set_active(ActiveRef("a", "digits", 1, SHA))
    with pytest.raises(StoreError, match="active"):
        store.write_slot("a", b, load_manifest(b))
    d = store.write_slot("b", b, load_manifest(b))
    assert manifest_sha256(d) == manifest_sha256(b)


def test_recovery_removes_partial_slots_and_staging(tmp_path: Path, make_version, ota_keys) -> None:
    pol = VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target="x86")
    store = BundleStore(tmp_path / "state")
    store.ensure()
    (store.slots_dir / "a.partial").mkdir()
    (store.slots_dir / "a.partial" / "model.onnx").write_bytes(b"half")
    (store.staging_dir / "d-x").mkdir()
    serving = Serving(pol)
    make_updater(tmp_path / "state", serving, pol, fallback=make_version(1))
    assert not (store.slots_dir / "a.partial").exists()
    assert list(store.staging_dir.iterdir()) == []
    assert serving.version == 1


# ------------------------------------------------------------------------------------------------ chunks over MQTT


def _publish(port: int, items: list[tuple[str, bytes]]) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for t, p in items:
        c.publish(t, p, qos=1, retain=True).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


def _mqtt_updater(
    port: int, tmp_path: Path, make_version: Any, ota_keys: dict[str, Path]
) -> tuple[Any, Serving]:
    """An updater serving signed v1 that fetches chunks from the broker on ``port``; and what it serves."""
    return signed_updater(tmp_path / "state", ota_keys, make_version, mqtt=MqttSettings("127.0.0.1", port))


def _chunked(bundle: Path, chunk: int) -> tuple[MqttSource, list[bytes], DeployCommand]:
    from device_agent.formats.deploy import bundle_stream

    files, mb, sb = bundle_stream(bundle)
    data = b"".join(f.read_bytes() for f in files)
    parts = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    sha = manifest_sha256(bundle)
    src = MqttSource(f"edgefleet/lab/bundles/{sha}", len(parts), chunk, mb, sb)
    m = load_manifest(bundle)
    cmd = DeployCommand("d-chunks", m.name, m.version, sha, sum(f.size_bytes for f in m.files), src)
    return src, parts, cmd


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_chunks_arriving_in_any_order_install(mosquitto, tmp_path, make_version, ota_keys) -> None:
    up, serving = _mqtt_updater(mosquitto.port, tmp_path, make_version, ota_keys)
    src, parts, cmd = _chunked(make_version(2), 2048)
    _publish(mosquitto.port, [(f"{src.topic}/{i}", parts[i]) for i in reversed(range(len(parts)))])
    assert up.deploy(cmd) is True
    assert serving.version == 2


@pytest.mark.broker
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "fault,reason", [("missing", "stalled"), ("short", "expected"), ("outside", "outside")]
)
def test_bad_chunks_fail_cleanly(
    fault, reason, mosquitto, tmp_path, make_version, ota_keys, monkeypatch
) -> None:
    import device_agent.update.fetch as U

    monkeypatch.setattr(U, "DOWNLOAD_STALL_S", 1.0)
    up, serving = _mqtt_updater(mosquitto.port, tmp_path, make_version, ota_keys)
    src, parts, cmd = _chunked(make_version(2), 2048)
    items = [(f"{src.topic}/{i}", p) for i, p in enumerate(parts)]
    if fault == "missing":
        items = items[:-1]
    elif fault == "short":
        items[0] = (items[0][0], items[0][1][:-1])
    else:
        items[-1] = (f"{src.topic}/{len(parts) + 5}", b"x")  # the last chunk is replaced by a stray one
    _publish(mosquitto.port, items)
    assert up.deploy(cmd) is False
    assert serving.version == 1
    assert reason in serving.events[-1][2]["reason"]
    assert list(up.store.staging_dir.iterdir()) == []


def test_mqtt_source_without_broker_settings_fails_with_a_reason(tmp_path, make_version, ota_keys) -> None:
    up, serving = signed_updater(tmp_path / "state", ota_keys, make_version)
    src, parts, cmd = _chunked(make_version(2), 2048)
    assert up.deploy(cmd) is False
    assert "no broker settings" in serving.events[-1][2]["reason"]


def test_local_source_is_consumed_even_when_refused(tmp_path, make_version, ota_keys) -> None:
    up, serving = signed_updater(tmp_path / "state", ota_keys, make_version)
    drop = make_version(2, key=None)
    assert up.deploy(LocalSource(str(drop))) is False
    assert not drop.exists()


# ------------------------------------------------------------------------------------------------ edgefleet serve


@pytest.mark.timeout(60)
def test_edgefleet_serve_serves_bundle_files_with_ranges(make_version, tmp_path) -> None:
    b = make_version(2)
    (b / "secret.txt").write_text("not listed")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from toolchain.cli import main; main()",
            "serve",
            str(b),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving" in line, line
        url = line.rsplit(" at ", 1)[1].strip()
        data = (b / "model.onnx").read_bytes()
        with urllib.request.urlopen(url + "model.onnx", timeout=10) as r:
            assert r.read() == data
        req = urllib.request.Request(url + "model.onnx", headers={"Range": "bytes=100-"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 206 and r.read() == data[100:]
            assert r.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        for path in ("secret.txt", "../etc/passwd", "%2e%2e/%2e%2e/etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path, timeout=10)
            assert e.value.code == 404
    finally:
        proc.terminate()
        proc.wait(10)


def test_agent_config_update_table(tmp_path: Path, make_version, ota_keys) -> None:
    from device_agent.config import load_config
    from device_agent.errors import ConfigError

    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    base = (
        f'[agent]\ndevice_id = "pi-1"\nfleet = "lab"\nbundle = "{make_version(1)}"\nstate_dir = "state"\n'
        f'trusted_keys = ["{ota_keys["pub"]}"]\n'
    )
    p = tmp_path / "agent.toml"
    p.write_text(base + '[update]\nhealth_window_s = 3\nmax_bundle_bytes = 50000000\nca_file = "ca.pem"\n')
    cfg = load_config(p)
    assert cfg.extra["update"] == {
        "health_window_s": 3.0,
        "max_bundle_bytes": 50_000_000,
        "ca_file": str(tmp_path / "ca.pem"),
    }
    p.write_text(base + '[update]\nca_file = "missing.pem"\n')
    with pytest.raises(ConfigError, match="ca_file"):
        load_config(p)
    p.write_text(base + "[update]\nhealth_windows = 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(p)


def test_command_queue_is_bounded(tmp_path, make_version, ota_keys) -> None:
    import device_agent.update.machine as U

    pol = VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target="x86")
    up = make_updater(tmp_path / "state", Serving(pol), pol, fallback=make_version(1), device_id="pi-001")
    for i in range(U.QUEUE_MAX):
        assert up.handle_command(enc(_mutate("deployment_id", f"d-{i}"))) is not None
    with pytest.raises(CommandError, match="already waiting"):
        up.handle_command(enc(_mutate("deployment_id", "d-overflow")))
    d = _mutate("deployment_id", "d-filtered")
    d["devices"] = ["someone-else"]
    assert up.handle_command(enc(d)) is None  # not for this device: ignored, not queued
