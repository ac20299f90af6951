"""ONNX in: a PyTorch-style NCHW CNN (dynamic batch) built for x86 and checked through the real agent.

The images (tests/toolchain/onnx_cases.py) are [0, 1], 3 channels, 16x16, three unbalanced classes,
two of which (horizontal and vertical stripes) swap when height and width are swapped: a layout slip
anywhere between the caller and the model shows up as lost accuracy, not only as a shape error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.formats.manifest import BundleError, Manifest, load_manifest
from tests.toolchain.onnx_cases import CLASSES, make_images, save_npz, train_weights, write_onnx

REPO = Path(__file__).resolve().parents[2]
EDGEFLEET = [sys.executable, "-c", "from toolchain.cli import main; main()"]
AGENT = [sys.executable, "-c", "from device_agent.cli import main; main()"]
CLI_TIMEOUT_S = 300


def _random_onnx(path: Path, input_shape: tuple[int | str, ...] | None = None) -> Path:
    """An untrained model of the same graph (enough for the checks that run before any conversion)."""
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 3, 8), (8,), (3, 3, 8, 8), (8,), (8, len(CLASSES)), (len(CLASSES),)]
    weights = [rng.normal(0, 0.1, s).astype(np.float32) for s in shapes]
    return write_onnx(weights, path, input_shape=input_shape)


def _edgefleet(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEFLEET, *args], cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


@pytest.fixture(scope="module")
def onnx_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained NCHW model and its data files (calibration, evaluation)."""
    d = tmp_path_factory.mktemp("onnx-in")
    x, y = make_images(480, seed=1)
    xe, ye = make_images(240, seed=2)
    return {
        "model": write_onnx(train_weights(x, y), d / "tiny_cnn.onnx"),
        "data": save_npz(d / "train.npz", x, y),
        "eval": save_npz(d / "test.npz", xe, ye),
        "dir": d,
    }


@pytest.fixture(scope="module")
def x86_build(onnx_case: dict[str, Path]) -> Path:
    """``edgefleet build tiny_cnn.onnx --target x86 --quantize ptq`` through the CLI."""
    out = onnx_case["dir"] / "bundles"
    r = _edgefleet(
        [
            "build",
            str(onnx_case["model"]),
            "--data",
            str(onnx_case["data"]),
            "--eval-data",
            str(onnx_case["eval"]),
            "--target",
            "x86",
            "--quantize",
            "ptq",
            "--out",
            str(out),
        ],
        REPO,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
def test_x86_bundle_keeps_nchw_and_accuracy_one_sample_at_a_time(
    onnx_case: dict[str, Path], x86_build: Path
) -> None:
    import onnx
    import onnxruntime as ort

    from device_agent.agent import Agent

    report = json.loads((x86_build / "report.json").read_text())
    entry = report["targets"]["x86"]
    assert entry["status"] == "ok", entry.get("error")
    # every runtime the target lists was checked as the device runs it
    assert set(entry["per_runtime"]) == {"onnxruntime", "openvino"}
    assert all(v["parity"] == "ok" for v in entry["per_runtime"].values())

    bundle = x86_build / "x86"
    m = load_manifest(bundle)
    assert m.input_layout == {"caller": "NCHW", "model": "NCHW"}
    assert tuple(m.inputs[0].shape) == (-1, 3, 16, 16)
    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # int8 QDQ, not the float copy
    conv_w = [
        i
        for i in graph.initializer
        if i.name.startswith("conv1.weight") and i.data_type == onnx.TensorProto.INT8
    ]
    assert conv_w, "the first convolution's weights are not stored as int8"

    ev = np.load(onnx_case["eval"])
    x, y = ev["x"], ev["y"]
    sess = ort.InferenceSession(str(onnx_case["model"]), providers=["CPUExecutionProvider"])
    float_pred = np.argmax(sess.run(None, {"input": x})[0], axis=1)
    float_acc = float(np.mean(float_pred == y))
    assert float_acc >= 0.9  # the model learned the task, so the int8 comparison means something
    budget = 0.01  # x86's max_accuracy_drop
    for runtime in ("onnxruntime", "openvino"):
        agent = Agent(bundle, allow_unsigned=True, runtime=runtime)
        preds = np.array(
            [
                int(np.argmax(agent.predict(np.ascontiguousarray(x[i : i + 1])).outputs[0]))
                for i in range(len(x))
            ]
        )
        acc = float(np.mean(preds == y))
        assert acc >= float_acc - budget, (runtime, acc, float_acc)
        assert float(np.mean(preds == float_pred)) >= 0.97, runtime
        # Height and width swapped: horizontal and vertical stripes trade places, so a layout slip
        # anywhere would be visible here as lost accuracy.
        swapped = np.ascontiguousarray(np.transpose(x, (0, 1, 3, 2)))
        stripes = y < 2
        flipped = np.array(
            [int(np.argmax(agent.predict(swapped[i : i + 1]).outputs[0])) for i in np.flatnonzero(stripes)]
        )
        assert float(np.mean(flipped == 1 - y[stripes])) >= 0.9, runtime


@pytest.mark.slow
def test_agent_predict_cli_takes_nchw_and_refuses_nhwc(onnx_case: dict[str, Path], x86_build: Path) -> None:
    ev = np.load(onnx_case["eval"])
    d = onnx_case["dir"]
    np.save(d / "nchw.npy", ev["x"][:40])
    np.save(d / "nhwc.npy", np.transpose(ev["x"][:40], (0, 2, 3, 1)))
    bundle = str(x86_build / "x86")
    ok = subprocess.run(
        [*AGENT, "predict", "--bundle", bundle, "--input", str(d / "nchw.npy"), "--json"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert ok.returncode == 0, ok.stderr
    labels = [p["label"] for p in json.loads(ok.stdout)["predictions"]]
    truth = [CLASSES[int(v)] for v in ev["y"][:40]]
    assert np.mean([a == b for a, b in zip(labels, truth, strict=True)]) >= 0.9
    bad = subprocess.run(
        [*AGENT, "predict", "--bundle", bundle, "--input", str(d / "nhwc.npy")],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert bad.returncode == 1
    err = [ln for ln in bad.stderr.splitlines() if ln.startswith("Error:")]
    assert len(err) == 1 and "3x16x16" in err[0], bad.stderr


@pytest.mark.slow
def test_agent_refuses_a_layout_it_would_have_to_transpose(x86_build: Path, tmp_path: Path) -> None:
    """A manifest whose caller layout differs from the model's is refused, never fed unconverted."""
    import shutil

    from device_agent.agent import Agent

    bundle = tmp_path / "x86"
    shutil.copytree(x86_build / "x86", bundle)
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["input_layout"] = {"caller": "NHWC", "model": "NCHW"}
    (bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="does not transpose"):
        Agent(bundle, allow_unsigned=True, runtime="onnxruntime")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize", "qat", "--target", "x86"], "QAT (--quantize qat) needs the Keras model"),
        (["--prune", "0.5", "--target", "x86"], "pruning (--prune) needs the Keras model"),
        (["--target", "mobile"], "need a TFLite model"),
        (["--target", "x86", "--target", "raspberry-pi"], "raspberry-pi need a TFLite model"),
    ],
)
def test_onnx_refuses_keras_only_work_in_one_line(flags: list[str], message: str, tmp_path: Path) -> None:
    model = _random_onnx(tmp_path / "m.onnx")
    x, y = make_images(40, seed=3)
    data = save_npz(tmp_path / "d.npz", x, y)
    r = _edgefleet(["build", str(model), "--data", str(data), *flags, "--out", str(tmp_path / "out")], REPO)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 16, 16), "fixed batch of 1; export it with a dynamic batch axis"),
        (("batch", 3, "h", "w"), "only the batch axis (the first) may be dynamic"),
    ],
)
def test_onnx_with_fixed_batch_or_free_sample_axes_is_refused(
    shape: tuple[int | str, ...], message: str, tmp_path: Path
) -> None:
    from toolchain.steps.models import ModelError, load_model

    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(_random_onnx(tmp_path / "m.onnx", shape))


def test_onnx_input_layout_is_read_from_the_graph(tmp_path: Path) -> None:
    from toolchain.steps.models import onnx_input_layout

    assert onnx_input_layout(_random_onnx(tmp_path / "m.onnx")) == "NCHW"


def test_manifest_without_input_layout_still_loads(tmp_path: Path) -> None:
    from tests.fabricate import digits, fit_softmax, flat_onnx_bundle, onnx_dense

    d = digits()
    w, b = fit_softmax(d["x"].reshape(len(d["x"]), -1), d["y"])
    bundle = flat_onnx_bundle(tmp_path / "b", onnx_dense(w, b, ["n", 64]), d["x"][:50])
    m = load_manifest(bundle)
    assert m.input_layout is None
    assert "input_layout" not in m.to_dict()  # old readers see the manifest they know
    doc = m.to_dict()
    doc["input_layout"] = {"caller": "NCHW", "model": "NCHW"}
    assert Manifest.from_dict(doc).input_layout == {"caller": "NCHW", "model": "NCHW"}
    assert Manifest.from_dict(json.loads(Manifest.from_dict(doc).to_bytes()))
    for bad in ({"caller": "CHW", "model": "NCHW"}, {"caller": "NCHW"}, "NCHW"):
        doc["input_layout"] = bad
        with pytest.raises(BundleError, match="input_layout"):
            Manifest.from_dict(doc)
