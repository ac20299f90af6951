"""Manifest validation and bundle verification (device_agent.formats.manifest), without any runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from device_agent.formats.manifest import (
    BundleError,
    FileEntry,
    Precision,
    RuntimeName,
    VerifyPolicy,
    file_entry,
    load_manifest,
    manifest_sha256,
    sign_manifest,
    verify_bundle,
)
from tests.fabricate import placeholder_tflite, tensor, write_bundle


def make_bundle(root: Path, version: int = 1, target: str = "raspberry-pi") -> Path:
    """A bundle with a placeholder model (never loaded): manifest, baseline text and labels.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.tflite").write_bytes(placeholder_tflite())
    return write_bundle(
        root,
        model_file="model.tflite",
        fmt="tflite",
        runtimes=["litert"],
        inputs=[tensor("x", (1, 8, 8, 1), "int8")],
        outputs=[tensor("y", (1, 2), "int8")],
        labels=["a", "b"],
        baseline="{}",
        labels_file=True,
        version=version,
        target=target,
    )


def keypair() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    k = Ed25519PrivateKey.generate()
    priv = k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return priv, k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_round_trip_and_verify(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    m = verify_bundle(b)
    assert m.name == "digits" and m.model.runtimes == (RuntimeName.LITERT,)
    assert load_manifest(b).to_bytes() == (b / "manifest.json").read_bytes()
    assert len(manifest_sha256(b)) == 64


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: (b / "model.tflite").write_bytes(b"TFL3" + bytes(range(199)) + b"\x00"), "sha256"),
        (lambda b: (b / "model.tflite").write_bytes(b"TFL3"), "bytes"),
        (lambda b: (b / "extra.bin").write_bytes(b"x"), "does not list"),
        (lambda b: (b / "labels.txt").unlink(), "missing"),
    ],
)
def test_altered_bundles_are_refused(tmp_path: Path, damage, message: str) -> None:
    b = make_bundle(tmp_path / "b")
    damage(b)
    with pytest.raises(BundleError, match=message):
        verify_bundle(b)


def test_symlinked_file_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    outside = tmp_path / "outside.txt"
    outside.write_text("a\nb\n")
    (b / "labels.txt").unlink()
    os.symlink(outside, b / "labels.txt")
    with pytest.raises(BundleError, match="symlink"):
        verify_bundle(b)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a//b", "manifest.json", "C:x"])
def test_escaping_paths_are_refused(tmp_path: Path, path: str) -> None:
    b = make_bundle(tmp_path / "b")
    doc = json.loads((b / "manifest.json").read_text())
    doc["files"][0]["path"] = path
    doc["model"]["path"] = path
    (b / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError):
        verify_bundle(b)


def test_unknown_keys_and_schema_are_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    doc = json.loads((b / "manifest.json").read_text())
    doc["surprise"] = 1
    (b / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="unknown key"):
        verify_bundle(b)
    doc.pop("surprise")
    doc["schema"] = 3
    (b / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="schema 3"):
        verify_bundle(b)


def test_manifest_records_precision_and_schema_1_still_reads_as_f32(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    doc = json.loads((b / "manifest.json").read_text())
    assert doc["schema"] == 2 and doc["model"]["precision"] == "f32"
    assert verify_bundle(b).model.precision == Precision.F32
    doc["model"]["precision"] = "bf16"
    (b / "manifest.json").write_text(json.dumps(doc))
    assert verify_bundle(b).model.precision == Precision.BF16
    doc["model"]["precision"] = "fp8"
    (b / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="model.precision 'fp8' is unknown"):
        verify_bundle(b)
    # schema 1 (bundles built before precision was recorded): no key, f32 as verified then
    doc["schema"] = 1
    del doc["model"]["precision"]
    (b / "manifest.json").write_text(json.dumps(doc))
    m = verify_bundle(b)
    assert m.model.precision == Precision.F32 and "precision" not in m.to_dict()["model"]
    assert json.loads(m.to_bytes()) == doc  # a schema-1 manifest round-trips unchanged
    doc["model"]["precision"] = "f32"  # schema 1 never had the key
    (b / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="unknown key"):
        verify_bundle(b)


def test_signature_policy(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b", version=3)
    priv, pub = keypair()
    _, other_pub = keypair()
    with pytest.raises(BundleError, match="unsigned"):
        verify_bundle(b, VerifyPolicy(trusted_keys=(pub,)))
    with pytest.raises(BundleError, match="allow_unsigned"):
        verify_bundle(b, VerifyPolicy())
    (b / "manifest.sig").write_bytes(sign_manifest((b / "manifest.json").read_bytes(), priv))
    assert verify_bundle(b, VerifyPolicy(trusted_keys=(pub,))).version == 3
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(b, VerifyPolicy(trusted_keys=(other_pub,)))
    with pytest.raises(BundleError, match="target"):
        verify_bundle(b, VerifyPolicy(trusted_keys=(pub,), target="coral"))
    with pytest.raises(BundleError, match="not newer"):
        verify_bundle(b, VerifyPolicy(trusted_keys=(pub,), min_version_exclusive=3))
    with pytest.raises(BundleError, match="cap"):
        verify_bundle(b, VerifyPolicy(trusted_keys=(pub,), max_bytes=10))
    # One changed byte in the manifest breaks the signature.
    raw = (b / "manifest.json").read_bytes().replace(b'"version": 3', b'"version": 4')
    (b / "manifest.json").write_bytes(raw)
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(b, VerifyPolicy(trusted_keys=(pub,)))


def test_file_entry_hashes(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    e = file_entry(tmp_path, "f")
    assert e == FileEntry("f", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 3)


def test_manifest_task_is_optional_and_strict(tmp_path: Path) -> None:
    """``task`` (issue 15): absent means classification and stays absent; a bad one is refused."""
    from device_agent.formats.manifest import BundleError, Manifest, load_manifest
    from tests.fabricate import digits, fit_softmax, flat_onnx_bundle, onnx_dense

    d = digits()
    w, b = fit_softmax(d["x"].reshape(len(d["x"]), -1), d["y"])
    m = load_manifest(flat_onnx_bundle(tmp_path / "b", onnx_dense(w, b, ["n", 64]), d["x"][:50]))
    assert m.task is None and m.task_type == "classification"
    assert "task" not in m.to_dict()  # agents from before issue 15 read it unchanged
    doc = m.to_dict()
    doc["task"] = {"type": "classification"}
    assert Manifest.from_dict(doc).task_type == "classification"
    for bad in (
        "regression",
        {"type": "clustering"},
        {"kind": "regression"},
        {"type": "classification", "x": 1},
    ):
        doc["task"] = bad
        with pytest.raises(BundleError, match="task"):
            Manifest.from_dict(doc)
