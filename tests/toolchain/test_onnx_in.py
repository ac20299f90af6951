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
from device_agent.inference import InputError
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


def _nhwc_bundle(src: Path, dst: Path, caller: str = "NCHW") -> Path:
    """``src`` (an NCHW bundle) with its model taking NHWC: a Transpose to NCHW put in front of the
    graph, the manifest's input tensor (-1, 16, 16, 3) and ``input_layout`` caller ``caller``,
    model NHWC; the model's hash and size updated (unsigned)."""
    import shutil

    import onnx
    from onnx import helper

    from device_agent.formats.manifest import MANIFEST_FILE, SIGNATURE_FILE, file_entry

    shutil.copytree(src, dst)
    (dst / SIGNATURE_FILE).unlink(missing_ok=True)
    m = load_manifest(dst)
    model = onnx.load(str(dst / m.model.path))
    g = model.graph
    old = g.input[0]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    assert dims[1:] == [3, 16, 16], dims
    new = helper.make_tensor_value_info("input_nhwc", old.type.tensor_type.elem_type, [dims[0], 16, 16, 3])
    g.node.insert(0, helper.make_node("Transpose", ["input_nhwc"], [old.name], perm=[0, 3, 1, 2]))
    g.input.remove(old)
    g.input.insert(0, new)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst / m.model.path))
    spec = m.inputs[0]
    m.inputs[0] = type(spec)("input_nhwc", (spec.shape[0], 16, 16, 3), spec.dtype, spec.quantization)
    m.input_layout = {"caller": caller, "model": "NHWC"}
    m.files = [file_entry(dst, f.path) if f.path == m.model.path else f for f in m.files]
    (dst / MANIFEST_FILE).write_bytes(m.to_bytes())
    return dst


@pytest.mark.slow
def test_agent_transposes_nchw_callers_for_an_nhwc_model(
    onnx_case: dict[str, Path], x86_build: Path, tmp_path: Path
) -> None:
    """A bundle whose model takes NHWC while its callers send NCHW (manifest ``input_layout``): the
    agent's predictions on NCHW images, one at a time, in batches and over HTTP, equal the NHWC
    model's own on the same images in NHWC; the statistics window matches the NCHW bundle's."""
    import http.client

    import onnxruntime as ort

    from device_agent.agent import Agent
    from device_agent.api import ApiServer

    bundle = _nhwc_bundle(x86_build / "x86", tmp_path / "nhwc")
    ev = np.load(onnx_case["eval"])
    x, y = ev["x"][:120], ev["y"][:120]
    nhwc = np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    direct = sess.run(None, {"input_nhwc": nhwc})[0]
    assert float(np.mean(direct.argmax(axis=1) == y)) >= 0.9  # the NHWC model itself is right
    # The stripes trade classes when height and width swap, so a transposition that mixed up H and
    # W would show here (and the model, fed NCHW pixels as NHWC, would not even take the shape).
    swapped = sess.run(None, {"input_nhwc": np.ascontiguousarray(np.transpose(x, (0, 3, 2, 1)))})[0]
    stripes = y < 2
    assert float(np.mean(swapped.argmax(axis=1)[stripes] == 1 - y[stripes])) >= 0.9

    for runtime in ("onnxruntime", "openvino"):
        # The same images through the NCHW bundle (the model without the Transpose in front).
        plain = Agent(x86_build / "x86", allow_unsigned=True, runtime=runtime)
        want = np.concatenate(
            [plain.predict(np.ascontiguousarray(x[i : i + 1])).outputs for i in range(len(x))]
        )
        plain.predict(x[:64])
        agent = Agent(bundle, allow_unsigned=True, runtime=runtime)
        assert agent.model.predictor.sample_shape == (3, 16, 16)  # what callers send
        one = np.concatenate(
            [agent.predict(np.ascontiguousarray(x[i : i + 1])).outputs for i in range(len(x))]
        )
        batch = agent.predict(x[:64]).outputs
        np.testing.assert_allclose(one, want, atol=1e-6)
        np.testing.assert_allclose(batch, want[:64], atol=1e-6)
        # The runtime's int8 kernels may round the last output step unlike a plain session's; the
        # top class agrees.
        assert float(np.mean(one.argmax(axis=1) == direct.argmax(axis=1))) >= 0.98, runtime
        with pytest.raises(InputError, match="3x16x16"):  # NHWC from the caller is refused
            agent.predict(nhwc[:1])
        # The statistics see the caller's layout, as the NCHW bundle's (and the baseline) do.
        window, base = agent.close_window().profile, plain.close_window().profile
        np.testing.assert_array_equal(window.inputs.counts, base.inputs.counts)
        np.testing.assert_allclose(window.inputs.mean, base.inputs.mean)
        np.testing.assert_array_equal(window.class_counts, base.class_counts)
        assert window.schema_violations == {**base.schema_violations, "shape": 1}
        if runtime == "onnxruntime":
            ort_want = want

    api = ApiServer(Agent(bundle, allow_unsigned=True, runtime="onnxruntime"), "127.0.0.1:0")
    api.start()
    try:
        host, port = api.address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in range(8):
            for body, headers in (
                (x[i].tobytes(), {"Content-Type": "application/octet-stream", "X-Shape": "3,16,16"}),
                (json.dumps({"inputs": x[i].tolist()}).encode(), {"Content-Type": "application/json"}),
            ):
                conn.request("POST", "/v1/predict", body, headers)
                r = conn.getresponse()
                doc = json.loads(r.read())
                assert r.status == 200, doc
                np.testing.assert_allclose(doc["outputs"][0], ort_want[i], atol=1e-6)
        conn.close()
    finally:
        api.shutdown()


@pytest.mark.slow
def test_predictor_transposes_nhwc_callers_for_an_nchw_model(
    onnx_case: dict[str, Path], x86_build: Path, tmp_path: Path
) -> None:
    """The other way round: callers send NHWC to the NCHW model; scores equal the NCHW bundle's."""
    import shutil

    from device_agent.formats.manifest import MANIFEST_FILE
    from device_agent.inference import Predictor

    bundle = tmp_path / "x86"
    shutil.copytree(x86_build / "x86", bundle)
    m = load_manifest(bundle)
    m.input_layout = {"caller": "NHWC", "model": "NCHW"}
    (bundle / MANIFEST_FILE).write_bytes(m.to_bytes())
    x = np.load(onnx_case["eval"])["x"][:40]
    plain = Predictor(x86_build / "x86", runtime="onnxruntime")
    turned = Predictor(bundle, runtime="onnxruntime")
    assert turned.sample_shape == (16, 16, 3) and turned.model_sample_shape == (3, 16, 16)
    np.testing.assert_allclose(turned.predict(np.transpose(x, (0, 2, 3, 1))), plain.predict(x), atol=1e-6)


def test_a_layout_conversion_needs_an_image_input() -> None:
    from device_agent.inference import caller_sample_shape, layout_permutation

    assert layout_permutation(None, 4, "m") is None
    assert layout_permutation({"caller": "NCHW", "model": "NCHW"}, 4, "m") is None
    perm = layout_permutation({"caller": "NCHW", "model": "NHWC"}, 4, "m")
    assert perm == (0, 2, 3, 1) and caller_sample_shape((16, 12, 3), perm) == (3, 16, 12)
    perm = layout_permutation({"caller": "NHWC", "model": "NCHW"}, 4, "m")
    assert perm == (0, 3, 1, 2) and caller_sample_shape((3, 16, 12), perm) == (16, 12, 3)
    with pytest.raises(BundleError, match="rank-2 input"):
        layout_permutation({"caller": "NCHW", "model": "NHWC"}, 2, "m")


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
