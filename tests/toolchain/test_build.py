"""The build pipeline end to end: real conversion, real runtimes, real bundles (marker slow)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.formats.manifest import VerifyPolicy, load_manifest, verify_bundle
from device_agent.formats.stats import baseline_from_dict
from device_agent.inference import Predictor
from toolchain.build import BuildError, build_bundles
from toolchain.steps.data import load_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# report.json key paths captured from the build before it ran as typed steps (issue #13)
REPORT_KEYS = json.loads((Path(__file__).parent / "report_keys.json").read_text())
RUNTIMES = {"litert", "onnxruntime", "openvino"}
# keyed by labels, op names, dtypes and int8 form names
BY_DATA = {"per_class", "float_per_class", "ops", "tensor_dtypes", "forms"}
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"
TARGETS = ["coral", "mobile", "raspberry-pi", "x86"]
IO = {  # target -> (input dtype, output dtype, batch)
    "mobile": ("float32", "float32", None),
    "raspberry-pi": ("int8", "int8", None),
    "coral": ("uint8", "uint8", 1),
    "x86": ("float32", "float32", None),
}


@pytest.fixture(scope="module")
def report(digits_bundles: Path) -> dict:
    return json.loads((digits_bundles / "report.json").read_text())


@pytest.mark.parametrize("target", TARGETS)
def test_every_bundle_verifies_and_keeps_the_profile_promise(digits_bundles: Path, target: str) -> None:
    m = verify_bundle(digits_bundles / target, VerifyPolicy(allow_unsigned=True, target=target))
    assert m.schema == 2 and m.name == "digits_cnn" and m.version == 1
    assert m.labels == [str(i) for i in range(10)]
    listed = {f.path for f in m.files}
    assert {m.model.path, "baseline.json", "labels.txt"} <= listed
    in_dt, out_dt, batch = IO[target]
    assert m.inputs[0].dtype.value == in_dt and m.outputs[0].dtype.value == out_dt
    assert tuple(m.inputs[0].shape[1:]) == (8, 8, 1)
    if batch is not None:
        assert m.inputs[0].shape[0] == batch
    if in_dt != "float32":
        assert m.inputs[0].quantization is not None
    assert m.model.format.value == ("onnx" if target == "x86" else "tflite")
    assert m.preprocessing == {"type": "none"}  # the CNN rescales inside the model
    assert m.metrics["accuracy"] > 0.8


@pytest.mark.parametrize("target", TARGETS)
def test_bundles_run_in_their_runtimes_with_the_reported_accuracy(
    digits_bundles: Path, report: dict, target: str
) -> None:
    test = load_dataset(DIGITS_TEST)
    m = load_manifest(digits_bundles / target)
    for rt in [r.value for r in m.model.runtimes]:
        scores = Predictor(digits_bundles / target, runtime=rt).predict(test.x)
        acc = float(np.mean(scores.argmax(1) == test.y))
        assert acc == pytest.approx(report["targets"][target]["per_runtime"][rt]["accuracy"], abs=1e-9)
        assert acc > 0.8


def test_baseline_is_the_device_profile_of_the_calibration_data(digits_bundles: Path) -> None:
    doc = json.loads((digits_bundles / "mobile" / "baseline.json").read_text())
    prof = baseline_from_dict(doc)
    calib = load_dataset(DIGITS)
    assert prof.count == calib.n  # every calibration sample's float output is counted
    assert prof.spec.features.kind == "elements" and len(prof.spec.features.names) == 64
    assert int(prof.inputs.count.max()) == calib.n
    assert prof.spec.labels == [str(i) for i in range(10)]
    # the same baseline ships in every target's bundle
    for t in TARGETS:
        assert json.loads((digits_bundles / t / "baseline.json").read_text())["spec_hash"] == doc["spec_hash"]


def test_report_has_the_promised_fields(digits_bundles: Path, report: dict) -> None:
    assert set(report["targets"]) == set(TARGETS)
    for t, e in report["targets"].items():
        assert e["status"] == "ok", e
        for k in (
            "accuracy",
            "float_accuracy",
            "size_bytes",
            "float_size_bytes",
            "latency_ms_p50",
            "sparsity",
            "top1_agreement",
            "sqnr_db",
            "build_s",
        ):
            assert e[k] is not None, (t, k)
        assert e["size_bytes"] < e["float_size_bytes"]
        assert e["top1_agreement"] >= 0.9 and e["sqnr_db"] > 10
        assert 0 <= e["sparsity"] < 0.2  # measured in the artifact, not requested (no pruning here)
        assert (
            e["latency_ms_p50"] > 0
            and e["latency_ms_p50"] == e["latency"][e["preferred_runtime"]]["threads_N"]["p50_ms"]
        )
    x86 = report["targets"]["x86"]
    assert set(x86["runtimes"]) == {"onnxruntime", "openvino"}
    lat = x86["latency"]
    assert x86["preferred_runtime"] == min(lat, key=lambda r: lat[r]["threads_N"]["p50_ms"])
    et = report["targets"]["coral"]["edgetpu"]
    assert et["ops_total"] >= 3 and et["ops_mapped"] == et["ops_total"] - len(et["unmapped"])
    manifest = load_manifest(digits_bundles / "coral")
    assert manifest.edgetpu is not None and manifest.edgetpu["ops_total"] == et["ops_total"]
    if shutil.which("edgetpu_compiler") is None:
        assert manifest.edgetpu["compiled"] is False and "not on PATH" in manifest.edgetpu["message"]
        assert manifest.model.accelerated_path is None
    else:
        assert manifest.model.accelerated_path == "model_edgetpu.tflite"
    html = (digits_bundles / "report.html").read_text()
    assert html.count("<svg") == 3 and "<script" not in html


def key_paths(obj: Any, prefix: str = "", parent: str = "") -> set[str]:
    """Return every dotted key path of a JSON document; runtime names read <runtime>, data keys *.

    Left out: what only a machine with edgetpu_compiler writes (compiler_ops_*), and the reasons
    under runtimes_excluded (keyed by whichever runtime the parity check happened to exclude).
    """
    out: set[str] = set()
    if not isinstance(obj, dict):
        return out
    for k, v in obj.items():
        if k in RUNTIMES or re.fullmatch(r"\w+@\d+", k):
            name = "<runtime>"
        else:
            name = "*" if parent in BY_DATA else k
        path = f"{prefix}.{name}" if prefix else name
        if k in ("compiler_ops_total", "compiler_ops_mapped") or parent == "runtimes_excluded":
            continue
        out.add(path)
        out |= key_paths(v, path, k)
    return out


def test_key_paths_reads_runtime_and_data_keys() -> None:
    doc = {
        "a": {"litert@2": {"p50_ms": 1}, "per_class": {"cat": {"recall": 1.0}}, "runtimes_excluded": {"x": 1}}
    }
    assert key_paths(doc) == {
        "a",
        "a.<runtime>",
        "a.<runtime>.p50_ms",
        "a.per_class",
        "a.per_class.*",
        "a.per_class.*.recall",
        "a.runtimes_excluded",
    }


def test_report_keys_are_those_of_the_build_before_typed_records(report: dict) -> None:
    """report.json is written from BuildContext/TargetResult; its keys are the untyped build's."""
    got, want = key_paths(report), set(REPORT_KEYS["digits_all_targets"])
    assert got == want, {"new": sorted(got - want), "lost": sorted(want - got)}


def build_digits(model: Path, targets: list[str], out: Path, **kw: Any) -> dict[str, Any]:
    """``build_bundles`` on the digits with the shipped test split for evaluation, accuracy drop allowed."""
    return build_bundles(
        model, DIGITS, targets, out, eval_data=DIGITS_TEST, progress=False, allow_accuracy_drop=True, **kw
    )


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    return dst


def test_rerunning_the_same_build_is_allowed_and_a_different_model_is_refused(
    digits_bundles: Path, digits_cnn_path: Path, tmp_path: Path
) -> None:
    out = _copy(digits_bundles, tmp_path)
    rep = build_digits(digits_cnn_path, ["mobile"], out)
    assert rep["targets"]["mobile"]["bundle_action"] == "rebuilt"
    assert set(rep["targets"]) == set(TARGETS)  # the report keeps the other targets' entries
    # Same name and version, different weights: refused, nothing touched.
    other = tmp_path / "digits_cnn.keras"
    import tf_keras

    model = tf_keras.models.load_model(digits_cnn_path)
    model.set_weights([w * 0.5 for w in model.get_weights()])
    model.save(other)
    before = (out / "mobile" / "manifest.json").read_bytes()
    with pytest.raises(BuildError, match=r"differs in baseline.json, model.tflite.*--version 2"):
        build_digits(other, ["mobile"], out)
    assert (out / "mobile" / "manifest.json").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    rep = build_digits(other, ["mobile"], out, version=2)
    assert rep["targets"]["mobile"]["bundle_action"] == "upgraded"
    assert load_manifest(out / "mobile").version == 2


def test_accuracy_budget_fails_the_target_unless_allowed(
    digits_cnn_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolchain.steps import target as target_steps

    real = target_steps.predict_artifact

    def degraded(artifact, runtime, x):  # type: ignore[no-untyped-def]
        scores = real(artifact, runtime, x)
        return np.roll(scores, 1, axis=1) if len(x) > 200 else scores  # break the eval-set predictions only

    monkeypatch.setattr(target_steps, "predict_artifact", degraded)
    out = tmp_path / "out"
    with pytest.raises(
        BuildError, match=r"points below float .* budget is 1.00 points .*--allow-accuracy-drop"
    ) as ei:
        build_bundles(digits_cnn_path, DIGITS, ["mobile"], out, eval_data=DIGITS_TEST, progress=False)
    assert ei.value.report is not None and ei.value.report["targets"]["mobile"]["status"] == "failed"
    assert not (out / "mobile").exists()
    assert json.loads((out / "report.json").read_text())["targets"]["mobile"]["status"] == "failed"
    rep = build_digits(digits_cnn_path, ["mobile"], out)
    assert rep["targets"]["mobile"]["status"] == "ok"
    assert rep["targets"]["mobile"]["accuracy_budget"].startswith("exceeded, allowed")
    assert (out / "mobile" / "manifest.json").is_file()


def test_held_out_split_when_no_eval_data(digits_cnn_path: Path, tmp_path: Path) -> None:
    rep = build_bundles(
        digits_cnn_path, DIGITS, ["raspberry-pi"], tmp_path / "o", progress=False, allow_accuracy_drop=True
    )
    n = load_dataset(DIGITS).n
    assert rep["data"]["eval"]["samples"] + rep["data"]["calibration_samples"] == n
    assert rep["data"]["eval"]["source"] == "held out from --data"


def test_signed_build(digits_cnn_path: Path, tmp_path: Path) -> None:
    signing = pytest.importorskip("toolchain.shipping.signing")
    priv, pub = signing.create_keys(tmp_path / "keys")
    from device_agent.formats.keys import load_public_key_file

    out = tmp_path / "o"
    build_digits(digits_cnn_path, ["mobile"], out, sign_key=priv)
    assert (out / "mobile" / "manifest.sig").is_file()
    m = verify_bundle(out / "mobile", VerifyPolicy(trusted_keys=(load_public_key_file(pub),)))
    assert m.name == "digits_cnn"


def test_qat_build(digits_cnn_path: Path, tmp_path: Path) -> None:
    rep = build_digits(digits_cnn_path, ["mobile", "x86"], tmp_path / "o", quantize="qat")
    for t in ("mobile", "x86"):
        e = rep["targets"][t]
        assert e["status"] == "ok", e.get("error")
        assert e["accuracy"] > 0.8 and e["top1_agreement"] > 0.9
        assert load_manifest(tmp_path / "o" / t).metrics["quantize"] == "qat"


def test_pruned_qat_build_for_x86(digits_cnn_path: Path, tmp_path: Path) -> None:
    """Prune-preserving QAT exported through tf2onnx (its dead scale inputs once broke quantization)."""
    rep = build_digits(digits_cnn_path, ["x86"], tmp_path / "o", quantize="qat", prune=0.5)
    e = rep["targets"]["x86"]
    assert e["status"] == "ok", e.get("error")
    assert e["sparsity"] >= 0.45 and e["top1_agreement"] > 0.9


def test_pruned_build_reaches_the_sparsity_in_the_artifact(digits_cnn_path: Path, tmp_path: Path) -> None:
    rep = build_digits(digits_cnn_path, ["mobile", "x86"], tmp_path / "o", prune=0.5)
    assert rep["prune"]["reached_in_keras"] >= 0.45
    got, want = key_paths(rep), set(REPORT_KEYS["digits_pruned_mobile_x86"])
    assert got == want, {"new": sorted(got - want), "lost": sorted(want - got)}  # keys as before #13
    for t in ("mobile", "x86"):
        e = rep["targets"][t]
        assert e["status"] == "ok", e.get("error")
        assert e["sparsity"] >= 0.4  # zeros counted in the shipped int8 weights
        assert e["gzip_size_bytes"] < e["size_bytes"]


def test_tabular_mlp_normalisation_moves_into_the_manifest(tmp_path: Path) -> None:
    """Raw features of very different ranges survive int8: the Normalization layer becomes preprocessing."""
    from toolchain.steps.train import train_model

    rng = np.random.default_rng(0)
    n = 1000  # 200 held out: one sample is 0.5 points
    temp = rng.normal(60, 15, n)
    vib = rng.normal(0.5, 0.2, n)  # 100x smaller range than temp: per-tensor int8 input would erase it
    state = np.where(temp + 40 * vib > 80, "hot", "ok")
    csv = tmp_path / "machines.csv"
    rows = "".join(f"{a:.3f},{b:.4f},{c}\n" for a, b, c in zip(temp, vib, state, strict=True))
    csv.write_text("temp_c,vibration,state\n" + rows)
    ds = load_dataset(csv, label="state")
    train_model(ds, "mlp", 30, tmp_path / "mlp.keras", progress=False)
    out = tmp_path / "o"
    rep = build_bundles(
        tmp_path / "mlp.keras", csv, ["all"], out, label="state", progress=False, allow_accuracy_drop=True
    )
    assert rep["preprocessing"]["type"] == "affine"
    for t, e in rep["targets"].items():
        assert e["status"] == "ok", (t, e.get("error"))
        # Without folding, int8 input quantization cost 6+ points here; with it, at most a few samples.
        assert e["accuracy"] >= e["float_accuracy"] - 0.02
        m = load_manifest(out / t)
        assert m.preprocessing["type"] == "affine" and len(m.preprocessing["scale"]) == 2
        # The device feeds raw values; the Predictor applies the declared preprocessing.
        scores = Predictor(out / t).predict(ds.x)
        assert float(np.mean(scores.argmax(1) == ds.y)) > 0.9
    base = json.loads((out / "x86" / "baseline.json").read_text())
    assert base["spec"]["features"]["names"] == ["temp_c", "vibration"]
    assert baseline_from_dict(base).inputs.max[0] > 50  # the baseline profiles raw values


def test_report_has_per_class_metrics_for_float_and_int8(digits_bundles: Path, report: dict) -> None:
    y = load_dataset(DIGITS_TEST).y
    labels = report["labels"]
    assert sum(m["support"] for m in report["float"]["per_class"].values()) == len(y)
    for t, e in report["targets"].items():
        for pc_key, cm_key, acc_key in (
            ("per_class", "confusion_matrix", "accuracy"),
            ("float_per_class", "float_confusion_matrix", "float_accuracy"),
        ):
            pc, cm = e[pc_key], np.array(e[cm_key])
            assert list(pc) == labels and cm.shape == (10, 10), t
            for i, label in enumerate(labels):
                assert cm[i].sum() == pc[label]["support"] == np.sum(y == i)
                assert pc[label]["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
            assert np.trace(cm) / len(y) == pytest.approx(e[acc_key])
        # the int8 matrix is the preferred runtime's, as the device computes it
        scores = Predictor(digits_bundles / t, runtime=e["preferred_runtime"]).predict(
            load_dataset(DIGITS_TEST).x
        )
        pred = scores.argmax(1)
        assert [[int(np.sum((y == i) & (pred == j))) for j in range(10)] for i in range(10)] == e[
            "confusion_matrix"
        ]
        cd = e["class_drop"]
        assert e["class_drop_budget"] == "ok" and cd["max_points"] == 10.0 and cd["failing"] == []
        assert set(cd["per_runtime"]) == set(e["runtimes"])
    html = (digits_bundles / "report.html").read_text()
    assert html.count('<table class="cm">') == 2 * len(report["targets"])
