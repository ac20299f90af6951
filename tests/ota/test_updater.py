"""The device updater end to end with real bundles, the real runtime, and real HTTP downloads.

Every failure case ends with the previous model serving (checked by predicting with it), the active
pointer unchanged, a ``deploy_failed`` event with the reason, and no staging files left behind.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.formats.deploy import DeployCommand, HttpSource, LocalSource
from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    VerifyPolicy,
    file_entry,
    load_manifest,
    manifest_sha256,
)
from device_agent.store import BundleStore
from device_agent.update import Updater
from tests.ota.harness import Serving, make_updater
from toolchain.shipping.serve import BundleHTTPServer


@pytest.fixture
def policy(ota_keys: dict[str, Path]) -> VerifyPolicy:
    return VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target="x86", max_bytes=10_000_000)


@pytest.fixture
def v1(make_version: Callable[..., Path]) -> Path:
    return make_version(1)


@pytest.fixture
def device(tmp_path: Path, v1: Path, policy: VerifyPolicy) -> tuple[Updater, Serving]:
    """An updater serving signed v1 from the config (no store bundle yet)."""
    serving = Serving(policy)
    up = make_updater(tmp_path / "state", serving, policy, fallback=v1)
    assert serving.version == 1
    return up, serving


def served_server(root: Path) -> Iterator[BundleHTTPServer]:
    srv = BundleHTTPServer(root)
    srv.start_background()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def command(bundle: Path, url: str, dep_id: str = "d-1") -> DeployCommand:
    m = load_manifest(bundle)
    return DeployCommand(
        dep_id,
        m.name,
        m.version,
        manifest_sha256(bundle),
        sum(f.size_bytes for f in m.files),
        HttpSource(url),
    )


def assert_still_v1(up: Updater, serving: Serving, digits: dict[str, np.ndarray], reason: str) -> None:
    assert serving.version == 1
    scores = serving.predict_ok(digits["x_test"][:20].reshape(20, -1))
    assert scores.shape == (20, 10)
    assert up.store.active() is None  # pointer never moved (or moved back)
    ev = serving.events[-1]
    assert ev[0] == "deploy_failed", serving.events
    assert reason in ev[2]["reason"], ev
    assert up.status()["state"] == "failed"
    assert list(up.store.staging_dir.iterdir()) == []
    assert not any(p.name.endswith(".partial") for p in up.store.slots_dir.iterdir())


# ------------------------------------------------------------------------------------------------ success


def test_http_deploy_commits_and_serves_new_version(device, make_version, digits, tmp_path) -> None:
    up, serving = device
    v2 = make_version(2)
    for srv in served_server(v2):
        assert up.deploy(command(v2, srv.url())) is True
    assert serving.version == 2
    ref = up.store.active()
    assert ref is not None and ref.version == 2 and ref.sha256 == manifest_sha256(v2)
    assert serving.events[-1][0] == "deployed"
    assert serving.events[-1][2]["version"] == 2 and serving.events[-1][2]["previous_version"] == 1
    states = [s for i, s in enumerate(serving.states) if i == 0 or serving.states[i - 1] != s]
    assert states == ["downloading", "verifying", "writing", "switching", "checking", "committed"]
    assert list(up.store.staging_dir.iterdir()) == []
    # the slot is a complete bundle that the real runtime serves
    scores = serving.predict_ok(digits["x_test"][:50].reshape(50, -1))
    assert (scores.argmax(1) == digits["y_test"][:50]).mean() > 0.8


def test_second_update_uses_the_other_slot_and_keeps_the_previous(device, make_version) -> None:
    up, serving = device
    v2, v3 = make_version(2), make_version(3)
    assert up.deploy(LocalSource(str(shutil.copytree(v2, v2.parent / "drop2"))))
    first = up.store.active()
    assert up.deploy(LocalSource(str(shutil.copytree(v3, v3.parent / "drop3"))))
    second = up.store.active()
    assert first is not None and second is not None and first.slot != second.slot
    assert load_manifest(up.store.slot_path(first.slot)).version == 2  # previous kept for a manual rollback
    assert serving.version == 3
    assert not (v2.parent / "drop2").exists()  # the drop is consumed


def test_same_bundle_again_is_reported_deployed_without_work(device, make_version) -> None:
    up, serving = device
    v2 = make_version(2)
    for srv in served_server(v2):
        assert up.deploy(command(v2, srv.url(), "d-a"))
        switches = len(serving.switches)
        assert up.deploy(command(v2, srv.url(), "d-b"))
    assert len(serving.switches) == switches
    assert serving.events[-1][0] == "deployed"


def test_retried_command_is_answered_again_not_redone(device, make_version) -> None:
    up, serving = device
    v0 = make_version(1)  # same version: refused (anti-rollback)
    for srv in served_server(v0):
        assert up.deploy(command(v0, srv.url(), "d-same")) is False
        n = len(serving.states)
        assert up.deploy(command(v0, srv.url(), "d-same")) is False
    assert len(serving.states) == n
    assert [e[0] for e in serving.events[-2:]] == ["deploy_failed", "deploy_failed"]


# ------------------------------------------------------------------------------------------------ refusals


def _corrupt_byte(b: Path) -> None:
    p = b / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(b: Path) -> None:
    p = b / "model.onnx"
    p.write_bytes(p.read_bytes()[:-7])


def _resign_with_path(b: Path, key: Path, rel: str) -> None:
    from toolchain.shipping.signing import sign_bundle

    doc = json.loads((b / MANIFEST_FILE).read_text())
    doc["files"][1]["path"] = rel
    doc["baseline"] = rel
    (b / MANIFEST_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    sign_bundle(b, key)


CASES: dict[str, tuple[dict, Callable[[Path, dict], None] | None, str]] = {
    "corrupted byte": ({}, lambda b, k: _corrupt_byte(b), "sha256"),
    "truncated file": ({}, lambda b, k: _truncate(b), "bytes"),
    "wrong key": ({"key": "other_key"}, None, "does not verify with any trusted key"),
    "unsigned": ({"key": None}, None, "unsigned"),
    "older version": ({"version": 0}, None, "not newer"),
    "same version": ({"version": 1}, None, "not newer"),
    "wrong target": ({"target": "coral"}, None, "target 'coral'"),
    "dotdot path": ({}, lambda b, k: _resign_with_path(b, k["key"], "../baseline.json"), "'..'"),
    "absolute path": ({}, lambda b, k: _resign_with_path(b, k["key"], "/etc/passwd"), "must be relative"),
}


@pytest.mark.parametrize("via", ["http", "local"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_bundle_is_refused_and_old_model_keeps_serving(
    case: str, via: str, device, make_version, ota_keys, digits, tmp_path
) -> None:
    up, serving = device
    kw, mutate, reason = CASES[case]
    version = kw.get("version", 2)
    key = kw.get("key", "key")
    if version == 0:
        # "older": v3 is active, v2 arrives
        assert up.deploy(LocalSource(str(make_version(3))))
        serving.events.clear()
        version = 2
    bad = make_version(version, key=key, target=kw.get("target"))
    if mutate is not None:
        mutate(bad, ota_keys)
    before = up.store.active()
    served_version = serving.version
    if via == "http":
        m_sha = manifest_sha256(bad)
        doc = json.loads((bad / MANIFEST_FILE).read_text())
        size = sum(f["size_bytes"] for f in doc["files"])
        cmd = DeployCommand("d-bad", doc["name"], doc["version"], m_sha, size, HttpSource("http://x/"))
        for srv in served_server(bad):
            cmd = DeployCommand(
                cmd.deployment_id, cmd.name, cmd.version, cmd.sha256, cmd.size_bytes, HttpSource(srv.url())
            )
            assert up.deploy(cmd) is False
    else:
        assert up.deploy(LocalSource(str(bad))) is False
        assert not bad.exists()  # the drop is consumed either way
    assert serving.version == served_version
    assert up.store.active() == before
    ev = serving.events[-1]
    assert ev[0] == "deploy_failed" and reason in ev[2]["reason"], ev
    assert list(up.store.staging_dir.iterdir()) == []
    if served_version == 1:
        assert_still_v1(up, serving, digits, reason)


def test_symlink_in_bundle_is_refused(device, make_version, digits, tmp_path) -> None:
    up, serving = device
    bad = make_version(2)
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", bad / "extra.txt")
    assert up.deploy(LocalSource(str(bad))) is False
    assert_still_v1(up, serving, digits, "symlink")


def test_listed_file_replaced_by_symlink_is_refused(device, make_version, digits, tmp_path) -> None:
    up, serving = device
    bad = make_version(2)
    real = tmp_path / "model-elsewhere.onnx"
    shutil.move(bad / "model.onnx", real)
    os.symlink(real, bad / "model.onnx")
    assert up.deploy(LocalSource(str(bad))) is False
    assert_still_v1(up, serving, digits, "symlink")


def test_extra_file_is_refused(device, make_version, digits) -> None:
    up, serving = device
    bad = make_version(2)
    (bad / "payload.sh").write_text("#!/bin/sh\n")
    assert up.deploy(LocalSource(str(bad))) is False
    assert_still_v1(up, serving, digits, "does not list")


def test_bundle_over_the_size_cap_is_refused_before_download(
    tmp_path, v1, make_version, ota_keys, digits
) -> None:
    pol = VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target="x86", max_bytes=1000)
    serving = Serving(pol)
    up = make_updater(tmp_path / "state", serving, pol, fallback=v1)
    v2 = make_version(2)
    hits: list[str] = []
    for srv in served_server(v2):
        orig = srv.RequestHandlerClass.do_GET

        def spy(h, _orig=orig):  # type: ignore[no-untyped-def]
            hits.append(h.path)
            return _orig(h)

        srv.RequestHandlerClass.do_GET = spy  # type: ignore[method-assign]
        try:
            assert up.deploy(command(v2, srv.url())) is False
        finally:
            srv.RequestHandlerClass.do_GET = orig  # type: ignore[method-assign]
    assert "more than the cap" in serving.events[-1][2]["reason"]
    assert "/model.onnx" not in hits  # rejected on the manifest alone
    assert serving.version == 1


# ------------------------------------------------------------------------------------------------ smoke, health, switch


def test_new_model_failing_smoke_inference_is_rolled_back(device, make_version, digits) -> None:
    up, serving = device
    bad = make_version(2, labels=["a", "b", "c"])  # the model returns 10 scores: smoke inference fails
    assert up.deploy(LocalSource(str(bad))) is False
    assert serving.switches[-1] == v1_dir(up)  # switched back
    assert_still_v1(up, serving, digits, "smoke inference")
    assert serving.events[-1][2]["state"] == "checking"


def v1_dir(up: Updater) -> Path:
    assert up.config.fallback_bundle is not None
    return up.config.fallback_bundle


def test_failed_health_window_rolls_back(tmp_path, v1, make_version, policy, digits) -> None:
    serving = Serving(policy)
    calls = [0]

    def health() -> bool:
        calls[0] += 1
        return calls[0] < 3  # healthy at first, then fails inside the window

    up = make_updater(tmp_path / "state", serving, policy, fallback=v1, health=health, health_window_s=5.0)
    assert up.deploy(LocalSource(str(make_version(2)))) is False
    assert_still_v1(up, serving, digits, "health check failed")


def test_agent_refusing_the_new_bundle_rolls_back(tmp_path, v1, make_version, policy, digits) -> None:
    serving = Serving(policy, refuse=True)
    up = make_updater(tmp_path / "state", serving, policy, fallback=v1)
    serving.switches.clear()
    assert up.deploy(LocalSource(str(make_version(2)))) is False
    assert_still_v1(up, serving, digits, "refused")


def test_rollback_returns_to_the_previous_store_slot(device, make_version) -> None:
    up, serving = device
    assert up.deploy(LocalSource(str(make_version(2))))
    ref2 = up.store.active()
    assert up.deploy(LocalSource(str(make_version(3, labels=["x"])))) is False
    assert up.store.active() == ref2
    assert serving.version == 2
    assert sorted(p.name for p in up.store.slots_dir.iterdir()) == [ref2.slot]  # failed slot removed


# ------------------------------------------------------------------------------------------------ downloads


class _Handler(http.server.BaseHTTPRequestHandler):
    """A misbehaving web server: ``mode`` decides what happens to model.onnx."""

    protocol_version = "HTTP/1.1"
    bundle: Path
    mode = "ok"
    ranges: list[str] = []
    model_requests = 0

    def log_message(self, *a):  # type: ignore[no-untyped-def]
        pass

    def do_GET(self) -> None:  # noqa: N802
        name = self.path.lstrip("/")
        p = self.bundle / name
        if not p.is_file():
            self.send_error(404)
            return
        data = p.read_bytes()
        if name != "model.onnx" or self.mode == "ok":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        type(self).model_requests += 1
        rng = self.headers.get("Range")
        if rng:
            type(self).ranges.append(rng)
        if self.mode == "endless":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                return
        if self.mode == "stall":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:100])
            self.wfile.flush()
            time.sleep(5)
            return
        if self.mode == "drop-once":
            if type(self).model_requests == 1:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            start = int(rng.split("=")[1].rstrip("-")) if rng else 0
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(data) - start))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            self.wfile.write(data[start:])


@pytest.fixture
def bad_server(tmp_path: Path) -> Iterator[Callable[[Path, str], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(bundle: Path, mode: str) -> str:
        handler = type("H", (_Handler,), {"bundle": bundle, "mode": mode, "ranges": [], "model_requests": 0})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        start.handler = handler  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_endless_download_stops_at_the_declared_size(device, make_version, bad_server, digits) -> None:
    up, serving = device
    v2 = make_version(2)
    assert up.deploy(command(v2, bad_server(v2, "endless"))) is False
    assert_still_v1(up, serving, digits, "more than the declared")


def test_stalled_download_times_out(device, make_version, bad_server, digits, monkeypatch) -> None:
    import device_agent.update.fetch as U

    monkeypatch.setattr(U, "DOWNLOAD_STALL_S", 0.5)
    monkeypatch.setattr(U, "DOWNLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(U, "DOWNLOAD_RETRY_S", 0.05)
    up, serving = device
    v2 = make_version(2)
    assert up.deploy(command(v2, bad_server(v2, "stall"))) is False
    assert_still_v1(up, serving, digits, "stalled")


def test_broken_download_resumes_with_a_range_request(device, make_version, bad_server, monkeypatch) -> None:
    import device_agent.update.fetch as U

    monkeypatch.setattr(U, "DOWNLOAD_RETRY_S", 0.05)
    up, serving = device
    v2 = make_version(2)
    url = bad_server(v2, "drop-once")
    assert up.deploy(command(v2, url)) is True
    handler = bad_server.handler  # type: ignore[attr-defined]
    size = (v2 / "model.onnx").stat().st_size
    assert handler.ranges == [f"bytes={size // 2}-"]
    assert serving.version == 2


def test_manifest_hash_must_match_the_command(device, make_version, digits) -> None:
    up, serving = device
    v2, v3 = make_version(2), make_version(3)
    for srv in served_server(v3):
        cmd = command(v2, srv.url())  # names v2's manifest, server has v3
        assert up.deploy(cmd) is False
    assert_still_v1(up, serving, digits, "the command names")


# ------------------------------------------------------------------------------------------------ disk full


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, int], None]]:
    """Mount a real tmpfs of a given size (needs root; this is how 'disk full' is produced here)."""
    mounted: list[Path] = []

    def mount(where: Path, size_bytes: int) -> None:
        where.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            from tests.conftest import missing_service

            missing_service(f"a small tmpfs (mount as root): {r.stderr.strip()[:100]}")
        mounted.append(where)

    yield mount
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _with_padding(b: Path, key: Path, size: int) -> Path:
    from toolchain.shipping.signing import sign_bundle

    (b / "padding.bin").write_bytes(os.urandom(size))
    m = load_manifest(b)
    m.files.append(file_entry(b, "padding.bin"))
    (b / MANIFEST_FILE).write_bytes(m.to_bytes())
    sign_bundle(b, key)
    return b


def test_disk_full_in_staging_is_refused_up_front(
    device, make_version, ota_keys, small_tmpfs, digits
) -> None:
    up, serving = device
    small_tmpfs(up.store.staging_dir, 256 * 1024)
    v2 = _with_padding(make_version(2), ota_keys["key"], 400 * 1024)
    for srv in served_server(v2):
        assert up.deploy(command(v2, srv.url())) is False
    assert_still_v1(up, serving, digits, "disk full in staging")


def test_disk_filling_up_during_download_fails_cleanly(
    device, make_version, ota_keys, small_tmpfs, digits, monkeypatch
) -> None:
    import device_agent.update.fetch as U

    up, serving = device
    small_tmpfs(up.store.staging_dir, 256 * 1024)
    # Pretend the space check saw enough room (another writer fills the disk meanwhile): the write
    # itself then hits the real ENOSPC of the tmpfs.
    monkeypatch.setattr(U, "DISK_MARGIN_BYTES", -(1 << 30))
    v2 = _with_padding(make_version(2), ota_keys["key"], 400 * 1024)
    for srv in served_server(v2):
        assert up.deploy(command(v2, srv.url())) is False
    assert_still_v1(up, serving, digits, "disk full in staging")


def test_staging_quota_refuses_large_bundles(tmp_path, v1, make_version, policy, digits) -> None:
    serving = Serving(policy)
    up = make_updater(tmp_path / "state", serving, policy, fallback=v1, staging_quota_bytes=1000)
    v2 = make_version(2)
    for srv in served_server(v2):
        assert up.deploy(command(v2, srv.url())) is False
    assert_still_v1(up, serving, digits, "staging quota")


# ------------------------------------------------------------------------------------------------ worker thread


@pytest.mark.timeout(60)
def test_worker_picks_up_a_drop_in_incoming(device, make_version) -> None:
    up, serving = device
    v2 = make_version(2)
    inc = up.store.incoming_dir
    partial = inc / "digits-v2.partial"
    shutil.copytree(v2, partial)
    assert up.poll_incoming() is False  # a .partial drop (still being copied) is never picked up
    assert serving.version == 1 and partial.exists()
    up.start()
    try:
        os.rename(partial, inc / "digits-v2")
        deadline = time.monotonic() + 30
        while serving.version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        up.stop()
    assert serving.version == 2
    assert list(inc.iterdir()) == []


def test_store_pointer_survives_a_new_updater(device, make_version, tmp_path, policy) -> None:
    up, serving = device
    assert up.deploy(LocalSource(str(make_version(2))))
    fresh = Serving(policy)
    up2 = make_updater(up.config.state_dir, fresh, policy, fallback=up.config.fallback_bundle)
    assert fresh.version == 2
    assert up2.status()["state"] == "committed"
    assert BundleStore(up.config.state_dir).active() == up.store.active()


def test_signature_file_is_kept_in_the_slot(device, make_version) -> None:
    up, serving = device
    assert up.deploy(LocalSource(str(make_version(2))))
    d = up.store.active_dir()
    assert d is not None and (d / SIGNATURE_FILE).is_file()


# ------------------------------------------------------------------------------------------------ HTTPS


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Callable[[Path], tuple[str, Path]]]:
    """An ``edgefleet serve`` server behind TLS with a self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    servers: list[BundleHTTPServer] = []

    def start(bundle: Path) -> tuple[str, Path]:
        srv = BundleHTTPServer(bundle)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_pem, key_pem)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.start_background()
        servers.append(srv)
        return srv.url().replace("http://", "https://"), cert_pem

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_https_download_with_a_private_ca(tmp_path, v1, make_version, policy, tls_server, digits) -> None:
    import ssl

    v2 = make_version(2)
    url, ca = tls_server(v2)
    serving = Serving(policy)
    up = make_updater(tmp_path / "untrusting", serving, policy, fallback=v1)
    assert up.deploy(command(v2, url, "d-tls-1")) is False
    assert_still_v1(up, serving, digits, "TLS certificate does not verify")
    serving = Serving(policy)
    up = make_updater(
        tmp_path / "trusting",
        serving,
        policy,
        fallback=v1,
        ssl_context=ssl.create_default_context(cafile=str(ca)),
    )
    assert up.deploy(command(v2, url, "d-tls-2")) is True
    assert serving.version == 2
