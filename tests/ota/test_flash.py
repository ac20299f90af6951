"""Keys, host-side verification and ``edgefleet flash`` to a local state_dir and over ssh:// (real sshd)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_agent.formats.keys import KeyFileError, load_trusted_keys
from device_agent.formats.manifest import (
    SIGNATURE_FILE,
    VerifyPolicy,
    load_manifest,
    manifest_sha256,
    verify_bundle,
)
from device_agent.store import BundleStore
from tests.ota.harness import signed_updater
from toolchain.cli import main
from toolchain.shipping.flash import FlashError, LocalDest, MqttDest, SshDest, parse_destination


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


# ------------------------------------------------------------------------------------------------ keys


def test_keys_create_writes_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    code, out = run("keys", "create", "--out", str(tmp_path / "k"))
    assert code == 0, out
    priv, pub = tmp_path / "k" / "fleet.key", tmp_path / "k" / "fleet.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(load_trusted_keys([pub])[0]) == 32
    code, out = run("keys", "create", "--out", str(tmp_path / "k"))
    assert code == 1 and "already exists" in out and "--force" in out


def test_device_refuses_a_private_key_as_trusted_key(ota_keys) -> None:
    with pytest.raises(KeyFileError, match="PRIVATE"):
        load_trusted_keys([ota_keys["key"]])
    with pytest.raises(KeyFileError, match="does not exist"):
        load_trusted_keys([ota_keys["pub"].parent / "missing.pub"])


def test_trusted_keys_accept_openssl_style_pem(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    k = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "a.pub").write_bytes(k.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    assert load_trusted_keys([tmp_path / "a.pub"]) == (k.public_bytes(Encoding.Raw, PublicFormat.Raw),)
    rsa = generate_private_key(65537, 2048).public_key()
    (tmp_path / "r.pub").write_bytes(rsa.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        load_trusted_keys([tmp_path / "r.pub"])


def test_sign_bundle_signs_the_exact_manifest_bytes(make_version, ota_keys) -> None:
    b = make_version(2)
    keys = load_trusted_keys([ota_keys["pub"]])
    verify_bundle(b, VerifyPolicy(trusted_keys=keys))
    doc = json.loads((b / SIGNATURE_FILE).read_text())
    assert doc["alg"] == "ed25519"
    raw = (b / "manifest.json").read_bytes()
    (b / "manifest.json").write_bytes(
        raw.replace(b'"version": 2', b'"version":  2')
    )  # same JSON, other bytes
    with pytest.raises(Exception, match="does not verify"):
        verify_bundle(b, VerifyPolicy(trusted_keys=keys))


# ------------------------------------------------------------------------------------------------ verify


def test_verify_cli(make_version, ota_keys) -> None:
    b = make_version(2)
    code, out = run("verify", str(b), "--key", str(ota_keys["pub"]))
    assert code == 0 and "signature verified" in out, out
    code, out = run("verify", str(b), "--key", str(ota_keys["other_pub"]))
    assert code == 1 and out.startswith("Error:") and "does not verify" in out
    code, out = run("verify", str(b), "--key", str(ota_keys["pub"]), "--target", "coral")
    assert code == 1 and "target" in out
    code, out = run("verify", str(b), "--json")
    assert code == 0 and json.loads(out)["signature"].startswith("present")
    (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"x")
    code, out = run("verify", str(b))
    assert code == 1 and "model.onnx" in out
    code, out = run("verify", str(b), "--bogus")
    assert code == 2


# ------------------------------------------------------------------------------------------------ destinations


def test_parse_destination() -> None:
    assert parse_destination("/var/lib/edgefleet") == LocalDest(Path("/var/lib/edgefleet"))
    assert parse_destination("ssh://pi@cam-1:2222/var/lib/edgefleet") == SshDest(
        "pi", "cam-1", 2222, "/var/lib/edgefleet"
    )
    d = parse_destination("mqtt://broker:1884/plant-a/cam-7")
    assert d == MqttDest("broker", 1884, False, None, None, "plant-a", "cam-7")
    assert parse_destination("mqtts://u:p@broker/plant-a") == MqttDest(
        "broker", 8883, True, "u", "p", "plant-a", None
    )
    for bad in ("ssh://host", "mqtt://broker", "mqtt://broker/Bad Fleet/x", "ftp://x/y", "mqtt://b/a/b/c"):
        with pytest.raises(FlashError):
            parse_destination(bad)


# ------------------------------------------------------------------------------------------------ local path


def test_flash_local_without_agent_leaves_a_complete_drop(make_version, ota_keys, tmp_path) -> None:
    b = make_version(2)
    state = tmp_path / "state"
    state.mkdir()
    code, out = run("flash", str(b), "--to", str(state), "--key", str(ota_keys["pub"]))
    assert code == 0, out
    drops = BundleStore(state).pending_incoming()
    assert len(drops) == 1 and manifest_sha256(drops[0]) == manifest_sha256(b)
    verify_bundle(drops[0], VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]])))
    assert not any(p.name.endswith(".partial") for p in (state / "bundles" / "incoming").iterdir())


def test_flash_refuses_bad_bundles_and_destinations(make_version, ota_keys, tmp_path) -> None:
    b = make_version(2, key="other_key")
    state = tmp_path / "state"
    state.mkdir()
    code, out = run("flash", str(b), "--to", str(state), "--key", str(ota_keys["pub"]))
    assert code == 1 and "does not verify" in out
    code, out = run("flash", str(make_version(2)), "--to", str(tmp_path / "missing"))
    assert code == 1 and "state_dir" in out
    assert not (state / "bundles").exists()


@pytest.mark.timeout(120)
def test_flash_local_is_activated_by_a_running_updater(make_version, ota_keys, tmp_path, digits) -> None:
    state = tmp_path / "state"
    up, serving = signed_updater(state, ota_keys, make_version)
    up.start()
    try:
        code, out = run("flash", str(make_version(2)), "--to", str(state), "--wait", "60")
        assert code == 0 and "now serves digits v2" in out, out
        assert serving.version == 2
        code, out = run("flash", str(make_version(2, key="other_key")), "--to", str(state), "--wait", "60")
        assert code == 1 and "refused" in out and "does not verify" in out, out
        assert serving.version == 2
    finally:
        up.stop()


# ------------------------------------------------------------------------------------------------ ssh://


@pytest.mark.ssh
@pytest.mark.timeout(180)
def test_flash_over_ssh_to_a_real_sshd(sshd, make_version, ota_keys, tmp_path) -> None:
    state = tmp_path / "device-state"
    state.mkdir()
    b = make_version(2)
    args = ["flash", str(b), "--to", sshd.url(state)]
    for o in sshd.ssh_options:
        args += ["--ssh-option", o]
    code, out = run(*args)
    assert code == 0, out
    drops = BundleStore(state).pending_incoming()
    assert len(drops) == 1
    verify_bundle(drops[0], VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]])))
    assert sorted(p.name for p in drops[0].iterdir()) == sorted(
        ["manifest.json", "manifest.sig"] + [f.path for f in load_manifest(b).files]
    )


@pytest.mark.ssh
@pytest.mark.timeout(180)
def test_flash_over_ssh_with_wait_reports_the_agents_result(sshd, make_version, ota_keys, tmp_path) -> None:
    state = tmp_path / "device-state"
    up, serving = signed_updater(state, ota_keys, make_version)
    up.start()
    try:
        opts: list[str] = []
        for o in sshd.ssh_options:
            opts += ["--ssh-option", o]
        code, out = run("flash", str(make_version(3)), "--to", sshd.url(state), "--wait", "90", *opts)
        assert code == 0 and "now serves digits v3" in out, out
        assert serving.version == 3
    finally:
        up.stop()


@pytest.mark.ssh
def test_flash_over_ssh_errors_are_one_line(sshd, make_version, tmp_path) -> None:
    opts: list[str] = []
    for o in sshd.ssh_options:
        opts += ["--ssh-option", o]
    code, out = run("flash", str(make_version(2)), "--to", sshd.url(tmp_path / "nope"), *opts)
    assert code == 1 and "no such directory" in out, out
    bad_key = [
        o if not o.startswith("IdentityFile=") else f"IdentityFile={tmp_path / 'none'}"
        for o in sshd.ssh_options
    ]
    opts = []
    for o in bad_key:
        opts += ["--ssh-option", o]
    code, out = run("flash", str(make_version(2)), "--to", sshd.url(tmp_path), *opts)
    assert code == 1 and "key-based login" in out, out
