"""Bundle assembly and placement: manifest last, atomic rename, refusal to overwrite a different bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.formats.manifest import DType, ModelFormat, Quantization, TensorSpec, verify_bundle
from device_agent.formats.stats import baseline_from_dict, baseline_to_dict, build_baseline
from toolchain.steps.package import (
    PackageError,
    assemble_bundle,
    bundle_name,
    check_destination,
    place_bundle,
    staging_dir,
)

LABELS = ["a", "b", "c"]


def _baseline() -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    p = rng.dirichlet(np.ones(3), size=50)
    return baseline_to_dict(build_baseline(x, p, LABELS), source={"data": "mem"})


def _stage(tmp_path: Path, dest: Path, model_bytes: bytes, version: int = 1, name: str = "demo") -> Path:
    model = tmp_path / f"m{version}-{len(model_bytes)}.onnx"
    model.write_bytes(model_bytes)
    st = staging_dir(dest)
    assemble_bundle(
        st,
        name=name,
        version=version,
        target="x86",
        model_file=model,
        model_format=ModelFormat.ONNX,
        runtimes=["onnxruntime", "openvino"],
        inputs=[TensorSpec("x", (-1, 4), DType.FLOAT32)],
        outputs=[TensorSpec("y", (-1, 3), DType.INT8, Quantization(0.0039, -128))],
        labels=LABELS,
        baseline=_baseline(),
        threads=2,
        metrics={"accuracy": 0.9},
    )
    return st


def test_assembled_bundle_verifies_and_lists_every_file(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "x86"
    st = _stage(tmp_path, dest, b"model-bytes")
    m = verify_bundle(st)
    assert {f.path for f in m.files} == {"model.onnx", "baseline.json", "labels.txt"}
    assert m.model.runtimes[0].value == "onnxruntime" and m.threads == 2
    assert (st / "labels.txt").read_text().splitlines() == LABELS
    prof = baseline_from_dict(json.loads((st / "baseline.json").read_text()))
    assert prof.count == 50
    assert place_bundle(st, dest) == "new"
    assert not st.exists() and verify_bundle(dest).name == "demo"
    assert [p.name for p in dest.parent.iterdir()] == ["x86"]  # no staging left behind


def test_same_build_again_is_allowed_different_content_refused(tmp_path: Path) -> None:
    dest = tmp_path / "x86"
    place_bundle(_stage(tmp_path, dest, b"same"), dest)
    assert place_bundle(_stage(tmp_path, dest, b"same"), dest) == "rebuilt"
    before = (dest / "manifest.json").read_bytes()
    st = _stage(tmp_path, dest, b"different")
    with pytest.raises(
        PackageError, match=r"different 'demo' version 1 for x86 \(differs in model.onnx\); pass --version 2"
    ):
        place_bundle(st, dest)
    assert (dest / "manifest.json").read_bytes() == before  # nothing already stored is lost
    assert (dest / "model.onnx").read_bytes() == b"same"


def test_higher_version_replaces_lower_refused(tmp_path: Path) -> None:
    dest = tmp_path / "x86"
    place_bundle(_stage(tmp_path, dest, b"v2", version=2), dest)
    with pytest.raises(PackageError, match=r"holds 'demo' version 2, newer than --version 1.*--version 3"):
        check_destination(dest, "demo", 1, "x86")
    assert place_bundle(_stage(tmp_path, dest, b"v3", version=3), dest) == "upgraded"
    assert verify_bundle(dest).version == 3


def test_other_bundles_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    dest = tmp_path / "x86"
    place_bundle(_stage(tmp_path, dest, b"m"), dest)
    with pytest.raises(PackageError, match=r"holds bundle 'demo' for target 'x86', not 'other'"):
        check_destination(dest, "other", 1, "x86")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(PackageError, match="not empty and holds no bundle"):
        check_destination(foreign, "demo", 1, "x86")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_destination(empty, "demo", 1, "x86") == "new"


def test_bundle_name_sanitises() -> None:
    assert bundle_name("My Model (v2)") == "my-model-v2"
    assert bundle_name("digits_cnn") == "digits_cnn"
    assert bundle_name("___") == "model"
